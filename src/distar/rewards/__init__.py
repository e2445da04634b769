"""Human-preference rewards: one interface, r(images, prompts) → (B,), and a weighted combination from config.

Each model returns its raw score (the original package's scale); `WeightedReward` puts every term on the scale the
paper's tables report (`PAPER_SCALE`) before weighting, so training and `distar evaluate` read rewards in one unit
and α_rew means what the paper's α_rew means (docs/METHOD.md §6, "Reward units")."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from distar.errors import UserError
from distar.rewards.digits import DigitReward
from distar.rewards.image_reward import ImageReward
from distar.rewards.models import AestheticHead, AestheticReward, ClipReward, RewardModel

LAION_CLIP_H = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
OPENAI_CLIP_L = "openai/clip-vit-large-patch14"

# name → (default model source, default processor/tokenizer source, default extra file)
DEFAULTS = {
    "pickscore": ("yuvalkirstain/PickScore_v1", LAION_CLIP_H, None),
    # The converted HPSv2.1 model as `distar cache` writes it (from xswu/HPSv2:HPS_v2.1_compressed.pt).
    "hpsv2.1": ("xswu/HPSv2-converted", LAION_CLIP_H, None),
    "clip": (OPENAI_CLIP_L, None, None),
    "aesthetic": (OPENAI_CLIP_L, None, "camenduru/improved-aesthetic-predictor:sac+logos+ava1-l14-linearMSE.pth"),
    # The converted ImageReward as `distar cache` writes it (from THUDM/ImageReward:ImageReward.pt), tokenizer inside.
    "imagereward": ("THUDM/ImageReward-converted", None, None),
    # The real-data lab's digit classifier (docs/LAB.md): no default, reward.sources.digits names it.
    "digits": (None, None, None),
}
KNOWN = tuple(DEFAULTS)

PAPER_SCALE = {"pickscore": 0.01, "hpsv2.1": 100.0, "imagereward": 1.0, "aesthetic": 1.0, "clip": 1.0, "digits": 1.0}
"""raw score × PAPER_SCALE = the paper's scale: PickScore as the cosine (raw logit_scale·cos ≈ 22 → ≈ 0.22),
HPSv2.1 × 100 (raw cosine ≈ 0.30 → ≈ 30), ImageReward and the aesthetic score raw, CLIP score already × 100; the
lab's digits reward is a log-probability, raw."""


@dataclass
class RewardSpec:
    """One term of the reward: name, weight, and where its weights come from (None: the default)."""

    name: str
    weight: float = 1.0
    source: str | None = None
    processor: str | None = None
    head: str | None = None


def load_reward(spec: RewardSpec, dtype="fp32", **resolve_kwargs) -> RewardModel:
    if spec.name not in DEFAULTS:
        raise UserError(f"unknown reward {spec.name!r}; known rewards: {', '.join(KNOWN)}")
    source, processor, head = DEFAULTS[spec.name]
    if spec.source:  # a model given explicitly brings its own tokenizer unless a processor is named too
        source, processor = spec.source, spec.processor
    processor, head = spec.processor or processor, spec.head or head
    if spec.name == "digits":
        return DigitReward.from_pretrained(spec.source, dtype=dtype, **resolve_kwargs)
    if spec.name == "imagereward":
        return ImageReward.from_pretrained(source, processor, dtype=dtype, **resolve_kwargs)
    if spec.name == "aesthetic":
        return AestheticReward.from_pretrained(source, head, processor, dtype=dtype, **resolve_kwargs)
    return ClipReward.from_pretrained(spec.name, source, processor, dtype=dtype, **resolve_kwargs)


class WeightedReward(nn.Module):
    """r = Σ_i w_i · s_i · raw_i with s_i = PAPER_SCALE: each term on the paper's scale; `terms` returns them."""

    def __init__(self, rewards: Sequence[RewardModel], weights: Sequence[float]):
        super().__init__()
        if len(rewards) != len(weights) or not rewards:
            raise ValueError("rewards and weights must be non-empty lists of the same length")
        self.rewards = nn.ModuleList(rewards)
        self.weights = [float(w) for w in weights]

    @classmethod
    def from_specs(cls, specs: Sequence[RewardSpec], dtype="fp32", **resolve_kwargs) -> WeightedReward:
        return cls([load_reward(s, dtype, **resolve_kwargs) for s in specs], [s.weight for s in specs])

    def terms(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Each reward's score on the paper's scale."""
        return {r.name: r(images, prompts) * PAPER_SCALE[r.name] for r in self.rewards}

    def combine(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """Σ_i w_i r_i from the paper-scale scores `terms` returns."""
        return sum(w * terms[r.name] for r, w in zip(self.rewards, self.weights, strict=True))

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.combine(self.terms(images, prompts))


__all__ = [
    "KNOWN",
    "PAPER_SCALE",
    "AestheticHead",
    "AestheticReward",
    "ClipReward",
    "DigitReward",
    "ImageReward",
    "RewardModel",
    "RewardSpec",
    "WeightedReward",
    "load_reward",
]
