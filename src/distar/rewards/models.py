"""Differentiable reward models: r(images, prompts) → scores (B,), images (B, 3, H, W) in [0, 1].

Each backend returns the score on its original package's scale:
  pickscore   logit_scale.exp() · cos(text, image)            (PickScore_v1: ≈ 22; the paper's tables show /100)
  hpsv2.1     cos(text, image) of the converted open_clip ViT-H-14 (≈ 0.30; the paper's tables show ×100)
  clip        100 · max(cos, 0) on CLIP ViT-L/14             (≈ 33)
  aesthetic   LAION improved aesthetic predictor on normalised CLIP ViT-L/14 image embeddings (≈ 5.7)
  imagereward BLIP ViT-L + BERT cross-attention + MLP head, normalised with the published mean and std (≈ 1.0)
All parameters are frozen; gradients reach the images only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from distar.errors import UserError
from distar.rewards.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    check_images_and_prompts,
    normalize,
    resize_longest_pad,
    resize_shortest_center_crop,
)
from distar.rewards.text import clean_prompts
from distar.sources import parse_dtype, read_state_dict, require_files, resolve_dir, resolve_file

_TRANSFORMERS_WEIGHTS = ["model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"]
_TOKENIZER_FILES = ["tokenizer.json", "vocab.json", "vocab.txt"]


def _image_config(root: Path) -> dict:
    """Size, mean and std from a preprocessor_config.json when present; CLIP's at 224 otherwise."""
    path = root / "preprocessor_config.json"
    cfg = json.loads(path.read_text()) if path.is_file() else {}
    crop = cfg.get("crop_size", 224)
    size = crop.get("height", 224) if isinstance(crop, dict) else int(crop)
    return {"size": size, "mean": tuple(cfg.get("image_mean", CLIP_MEAN)), "std": tuple(cfg.get("image_std", CLIP_STD))}


class RewardModel(nn.Module):
    """Common frozen-reward behaviour: input checks, preprocessing, no gradient to weights."""

    name = "reward"

    def freeze(self) -> RewardModel:
        return self.requires_grad_(False).eval()

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_images_and_prompts(images, prompts)
        dtype = next(self.parameters()).dtype
        return self.score(self.preprocess(images.float()).to(dtype), list(prompts)).float()


class ClipReward(RewardModel):
    """A CLIPModel scored as PickScore, HPSv2.1 or CLIP score (they differ only in weights, scale and resize)."""

    KINDS = ("pickscore", "hpsv2.1", "clip")

    def __init__(self, kind: str, model, tokenizer, image_config: dict):
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"kind={kind!r} is not a CLIP reward; choose one of {self.KINDS}")
        self.name, self.model, self.tokenizer, self.image_config = kind, model, tokenizer, image_config
        self.freeze()

    @classmethod
    def from_pretrained(cls, kind: str, source, processor=None, dtype="fp32", **resolve_kwargs) -> ClipReward:
        from transformers import AutoTokenizer, CLIPModel

        root = resolve_dir(source, **resolve_kwargs)
        proc = resolve_dir(processor, **resolve_kwargs) if processor else root
        require_files(root, {kind: [["config.json"], _TRANSFORMERS_WEIGHTS]})
        require_files(proc, {f"{kind} tokenizer": [_TOKENIZER_FILES]})
        model = CLIPModel.from_pretrained(root, dtype=parse_dtype(dtype))
        return cls(kind, model, AutoTokenizer.from_pretrained(proc), _image_config(proc))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        size = self.image_config["size"]
        resized = (
            resize_longest_pad(images, size) if self.name == "hpsv2.1" else resize_shortest_center_crop(images, size)
        )
        return normalize(resized, self.image_config["mean"], self.image_config["std"])

    def tokenize(self, prompts: list[str]):
        """Token ids and mask as the upstream scorer makes them (its text cleaning first: distar.rewards.text)."""
        return self.tokenizer(
            clean_prompts(self.name, prompts), padding="max_length", truncation=True, max_length=77, return_tensors="pt"
        )

    def embed_text(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenize(prompts)
        device = next(self.parameters()).device
        # The padding mask cannot change CLIP's pooled (EOS) output under its causal mask; shape-only runs on "meta"
        # leave it out because building it reads values.
        mask = None if device.type == "meta" else ids.attention_mask.to(device)
        with torch.no_grad():
            text = self.model.get_text_features(input_ids=ids.input_ids.to(device), attention_mask=mask).pooler_output
        return text / text.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image features of images in [0, 1] (the guardrails' diversity measure)."""
        dtype = next(self.parameters()).dtype
        image = self.model.get_image_features(pixel_values=self.preprocess(images.float()).to(dtype)).pooler_output
        return (image / image.norm(dim=-1, keepdim=True)).float()

    def score(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        image = self.model.get_image_features(pixel_values=pixels).pooler_output
        image = image / image.norm(dim=-1, keepdim=True)
        cos = (image * self.embed_text(prompts)).sum(-1)
        if self.name == "pickscore":
            return self.model.logit_scale.exp() * cos
        if self.name == "clip":
            return 100.0 * cos.clamp(min=0)
        return cos


class PreferenceMLP(nn.Module):
    """The MLP head shared by the LAION improved aesthetic predictor and ImageReward: 1024-128-64-16-1 with
    dropout, keys layers.0 … layers.7 exactly as in both originals' checkpoints."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds).squeeze(-1)


AestheticHead = PreferenceMLP


class AestheticReward(RewardModel):
    """LAION aesthetic score: the MLP head on L2-normalised CLIP ViT-L/14 image embeddings (prompts unused)."""

    name = "aesthetic"

    def __init__(self, vision, head: PreferenceMLP, image_config: dict):
        super().__init__()
        self.vision, self.head, self.image_config = vision, head, image_config
        self.freeze()

    @classmethod
    def from_pretrained(cls, source, head, processor=None, dtype="fp32", **resolve_kwargs) -> AestheticReward:
        from transformers import CLIPVisionModelWithProjection

        root = resolve_dir(source, **resolve_kwargs)
        require_files(root, {"aesthetic CLIP": [["config.json"], _TRANSFORMERS_WEIGHTS]})
        vision = CLIPVisionModelWithProjection.from_pretrained(root, dtype=parse_dtype(dtype))
        state = read_state_dict(resolve_file(head, **resolve_kwargs))
        head_module = PreferenceMLP(state["layers.0.weight"].shape[1] if "layers.0.weight" in state else 768)
        try:
            head_module.load_state_dict(state)
        except RuntimeError as err:
            raise UserError(f"{str(head)!r} is not a LAION aesthetic predictor head: {err}") from err
        proc = resolve_dir(processor, **resolve_kwargs) if processor else root
        return cls(vision, head_module.to(parse_dtype(dtype)), _image_config(proc))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        size = self.image_config["size"]
        return normalize(resize_shortest_center_crop(images, size), self.image_config["mean"], self.image_config["std"])

    def score(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        embeds = self.vision(pixel_values=pixels).image_embeds
        return self.head(embeds / embeds.norm(dim=-1, keepdim=True))
