"""ImageReward (Xu et al. 2023) on transformers' BLIP classes.

Original: `THUDM/ImageReward:ImageReward.pt` = BLIP ViT-L visual encoder + BLIP's BERT text encoder with
cross-attention to the image + an MLP head; r = (mlp(text_cls) − mean) / std with the published constants.
Its `image-reward` package does not import with transformers 5; the same function is rebuilt here from
BlipVisionModel and BlipTextModel, whose keys map one-to-one (see `convert_image_reward`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from distar.errors import UserError
from distar.rewards.models import PreferenceMLP, RewardModel
from distar.rewards.preprocess import CLIP_MEAN, CLIP_STD, normalize, resize_shortest_center_crop
from distar.rewards.text import clean_prompts
from distar.sources import parse_dtype, read_state_dict, require_files, resolve_dir

IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
IMAGEREWARD_MAX_LENGTH = 35


ImageRewardHead = PreferenceMLP


def imagereward_configs():
    """BLIP ViT-L/16 at 384→224 and BERT-base with cross-attention to 1024-d image tokens, as ImageReward uses."""
    from transformers import BlipTextConfig, BlipVisionConfig

    vision = BlipVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=224,
        patch_size=16,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
    )
    text = BlipTextConfig(
        vocab_size=30524,
        hidden_size=768,
        encoder_hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=512,
        layer_norm_eps=1e-12,
        is_decoder=True,
    )
    return vision, text


class ImageReward(RewardModel):
    name = "imagereward"

    def __init__(
        self,
        vision,
        text,
        head: ImageRewardHead,
        tokenizer,
        mean=IMAGEREWARD_MEAN,
        std=IMAGEREWARD_STD,
        image_size: int = 224,
        max_length: int = IMAGEREWARD_MAX_LENGTH,
    ):
        super().__init__()
        self.vision, self.text, self.head, self.tokenizer = vision, text, head, tokenizer
        self.mean, self.std, self.image_size, self.max_length = mean, std, image_size, max_length
        self.freeze()

    @classmethod
    def from_pretrained(cls, source, processor=None, dtype="fp32", **resolve_kwargs) -> ImageReward:
        """A directory written by `convert_image_reward` (vision/, text/, head.safetensors, imagereward.json)."""
        from safetensors.torch import load_file
        from transformers import AutoTokenizer, BlipTextModel, BlipVisionModel

        root = resolve_dir(source, **resolve_kwargs)
        require_files(
            root,
            {
                "imagereward": [
                    ["imagereward.json"],
                    ["vision/config.json"],
                    ["vision/model.safetensors"],
                    ["text/config.json"],
                    ["text/model.safetensors"],
                    ["head.safetensors"],
                ]
            },
        )
        proc = resolve_dir(processor, **resolve_kwargs) if processor else root / "tokenizer"
        require_files(proc, {"imagereward tokenizer": [["tokenizer.json", "vocab.txt"]]})
        meta = json.loads((root / "imagereward.json").read_text())
        dtype = parse_dtype(dtype)
        vision = BlipVisionModel.from_pretrained(root / "vision", dtype=dtype)
        text = BlipTextModel.from_pretrained(root / "text", dtype=dtype, add_pooling_layer=False)
        head = ImageRewardHead(text.config.hidden_size)
        head.load_state_dict(load_file(str(root / "head.safetensors")))
        return cls(
            vision,
            text,
            head.to(dtype),
            AutoTokenizer.from_pretrained(proc),
            meta["mean"],
            meta["std"],
            vision.config.image_size,
            meta.get("max_length", IMAGEREWARD_MAX_LENGTH),
        )

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(resize_shortest_center_crop(images, self.image_size), CLIP_MEAN, CLIP_STD)

    def tokenize(self, prompts: list[str]):
        """Token ids and mask as ImageReward's `score` makes them (BLIP's BERT tokenizer, max_length 35)."""
        return self.tokenizer(
            clean_prompts(self.name, prompts),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )

    def score(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        device = pixels.device
        ids = self.tokenize(prompts)
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=device)
        out = self.text(
            input_ids=ids.input_ids.to(device),
            attention_mask=ids.attention_mask.to(device),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
            is_decoder=False,
        )
        return (self.head(out.last_hidden_state[:, 0, :]) - self.mean) / self.std


def _vision_key(key: str) -> str | None:
    """BLIP ViT key (after `blip.visual_encoder.`) → BlipVisionModel key."""
    fixed = {
        "cls_token": "embeddings.class_embedding",
        "pos_embed": "embeddings.position_embedding",
        "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
        "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
        "norm.weight": "post_layernorm.weight",
        "norm.bias": "post_layernorm.bias",
    }
    if key in fixed:
        return fixed[key]
    if key.startswith("blocks."):
        _, i, rest = key.split(".", 2)
        rest = (
            rest.replace("norm1", "layer_norm1")
            .replace("norm2", "layer_norm2")
            .replace("attn.qkv", "self_attn.qkv")
            .replace("attn.proj", "self_attn.projection")
        )
        return f"encoder.layers.{i}.{rest}"
    return None


def split_image_reward_state(state: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """ImageReward.pt's state dict → (BlipVisionModel, BlipTextModel, ImageRewardHead) state dicts."""
    vision, text, head = {}, {}, {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith("blip.visual_encoder."):
            new = _vision_key(key.removeprefix("blip.visual_encoder."))
            if new is None:
                raise UserError(f"unexpected key {key!r} in the ImageReward visual encoder")
            vision[new] = value
        elif key.startswith("blip.text_encoder."):
            new = key.removeprefix("blip.text_encoder.")
            if not new.endswith("position_ids"):
                text[new] = value
        elif key.startswith("mlp."):
            head[key.removeprefix("mlp.")] = value
    if not vision or not text or not head:
        raise UserError(
            "not an ImageReward state dict: expected keys under blip.visual_encoder., blip.text_encoder. and mlp."
        )
    return vision, text, head


def convert_image_reward(
    checkpoint: str | os.PathLike, out_dir: str | os.PathLike, tokenizer_source=None, configs=None
) -> Path:
    """ImageReward.pt → a directory `ImageReward.from_pretrained` reads. tokenizer_source: BLIP's tokenizer
    (bert-base-uncased plus [DEC] and [ENC]); when given as a directory it is copied under tokenizer/."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, BlipTextModel, BlipVisionModel

    vision_cfg, text_cfg = configs or imagereward_configs()
    state = read_state_dict(checkpoint)
    vision_sd, text_sd, head_sd = split_image_reward_state(state)
    out = Path(out_dir)
    vision = BlipVisionModel(vision_cfg)
    text = BlipTextModel(text_cfg, add_pooling_layer=False)
    head = ImageRewardHead(text_cfg.hidden_size)
    for name, module, sd in (("vision", vision, vision_sd), ("text", text, text_sd), ("head", head, head_sd)):
        try:
            module.load_state_dict(sd, strict=True)
        except RuntimeError as err:
            raise UserError(
                f"{str(checkpoint)!r}: the {name} part does not fit ImageReward's architecture: {err}"
            ) from err
    vision.save_pretrained(out / "vision")
    text.save_pretrained(out / "text")
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(out / "head.safetensors"))
    meta = {"mean": IMAGEREWARD_MEAN, "std": IMAGEREWARD_STD, "max_length": IMAGEREWARD_MAX_LENGTH}
    (out / "imagereward.json").write_text(json.dumps(meta))
    if tokenizer_source is not None:
        AutoTokenizer.from_pretrained(resolve_dir(tokenizer_source)).save_pretrained(out / "tokenizer")
    return out
