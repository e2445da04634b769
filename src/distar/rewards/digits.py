"""The real-data lab's reward: a small CNN trained on handwritten digits, scored as the log-probability of the digit
the prompt names (`distar lab digits`, docs/LAB.md). Learned, differentiable and, like PickScore, open to
adversarial pixels: what the lab needs to show reward hacking and what a divergence holds against it.

A model directory holds config.json ({"kind": "digit-classifier", "width": W, "side": S}) and model.safetensors.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from distar import readers
from distar.errors import UserError
from distar.rewards.models import RewardModel
from distar.sources import parse_dtype, read_state_dict, require_files, resolve_dir

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
KIND = "digit-classifier"
_WORD = re.compile(r"\b(" + "|".join(DIGIT_WORDS) + r")\b")


def digit_of(prompt: str) -> int:
    """The digit a prompt names: its last digit word ("a handwritten digit seven" → 7)."""
    found = _WORD.findall(prompt.lower())
    if not found:
        raise UserError(f"the digits reward needs prompts that name a digit ({', '.join(DIGIT_WORDS)}); got {prompt!r}")
    return DIGIT_WORDS.index(found[-1])


class DigitClassifier(nn.Module):
    """Grey-scale digits at side × side (8×8 in the data, read at 16×16): three convolutions, two poolings, a
    hidden layer whose activations are the lab's judge features, and ten logits."""

    def __init__(self, width: int = 32, side: int = 16):
        super().__init__()
        self.width, self.side = width, side
        self.conv = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.SiLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.SiLU(),
            nn.AvgPool2d(2),
        )
        self.hidden = nn.Linear(2 * width * (side // 4) ** 2, 128)
        self.head = nn.Linear(128, 10)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], (B, 3, H, W) or (B, 1, H, W), to the network's grey side × side input in [-1, 1]."""
        grey = images.mean(dim=1, keepdim=True) if images.shape[1] != 1 else images
        if grey.shape[-2:] != (self.side, self.side):
            grey = F.interpolate(grey, size=(self.side, self.side), mode="bilinear", antialias=True)
        return grey * 2 - 1

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return F.silu(self.hidden(self.conv(self.prepare(images)).flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def config(self) -> dict:
        return {"kind": KIND, "width": self.width, "side": self.side}

    def save(self, out: str | Path) -> Path:
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(self.config()))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(out / "model.safetensors"))
        return out

    @classmethod
    def load(cls, root: Path, dtype=torch.float32) -> DigitClassifier:
        require_files(root, {"digit classifier": [["config.json"], ["model.safetensors"]]})
        from fsspec.implementations.local import LocalFileSystem

        where = str(root / "config.json")
        config = readers.read_mapping(LocalFileSystem(), where)
        if config.get("kind") != KIND:
            raise UserError(f"{root} is not a digit classifier (config.json kind {config.get('kind')!r}, not {KIND!r})")
        width = readers.integer(config, "width", where, lo=1)
        side = readers.integer(config, "side", where, lo=4)
        if side % 4 or width > 4096 or side > 1024:
            raise UserError(f"{where}: width {width} and side {side} do not describe a digit classifier")
        net = cls(width, side)
        try:
            net.load_state_dict(read_state_dict(root / "model.safetensors"))
        except RuntimeError as err:
            raise UserError(f"{root / 'model.safetensors'} does not fit {config}: {err}") from err
        return net.to(dtype)


class DigitReward(RewardModel):
    """r = log p(the prompted digit | image) under a DigitClassifier (≤ 0; 0 is certainty)."""

    name = "digits"

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        self.classifier = classifier
        self.freeze()

    @classmethod
    def from_pretrained(cls, source, dtype="fp32", **resolve_kwargs) -> DigitReward:
        if not source:
            raise UserError(
                "the digits reward has no default model: set reward.sources.digits to a classifier directory "
                "(`distar lab digits` writes one under DIR/stages/rewards/reward)"
            )
        return cls(DigitClassifier.load(resolve_dir(source, **resolve_kwargs), parse_dtype(dtype)))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def score(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        digits = torch.tensor([digit_of(p) for p in prompts], device=pixels.device)
        logp = self.classifier(pixels).float().log_softmax(dim=-1)
        return logp.gather(1, digits[:, None]).squeeze(1)
