"""Checkpoint converters: from each reward's original format to the transformers classes distar loads.

- HPSv2.1: `HPS_v2.1_compressed.pt` (xswu/HPSv2) is an open_clip ViT-H-14 state dict (OpenAI-CLIP layout).
  It maps key-by-key onto transformers' CLIPModel; fused attention in-projections are split into q, k, v
  and the projection matrices are transposed.
- LAION aesthetic head: its .pth keys already match `AestheticHead` (layers.0 … layers.7); no conversion.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from distar.errors import UserError
from distar.sources import read_state_dict


def hpsv2_clip_config():
    """open_clip ViT-H-14 as a transformers CLIPConfig (GELU, 32 vision / 24 text layers, 1024-d embedding)."""
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(
            vocab_size=49408,
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            max_position_embeddings=77,
            hidden_act="gelu",
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=16,
            image_size=224,
            patch_size=14,
            hidden_act="gelu",
        ),
        projection_dim=1024,
    )


def _block(prefix_in: str, prefix_out: str, sd: dict, out: dict) -> None:
    q, k, v = sd[f"{prefix_in}.attn.in_proj_weight"].chunk(3, dim=0)
    qb, kb, vb = sd[f"{prefix_in}.attn.in_proj_bias"].chunk(3, dim=0)
    for name, w, b in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
        out[f"{prefix_out}.self_attn.{name}.weight"], out[f"{prefix_out}.self_attn.{name}.bias"] = w, b
    renames = {
        "attn.out_proj": "self_attn.out_proj",
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
    }
    for src, dst in renames.items():
        for p in ("weight", "bias"):
            out[f"{prefix_out}.{dst}.{p}"] = sd[f"{prefix_in}.{src}.{p}"]


def open_clip_to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip (OpenAI-layout) CLIP state dict → transformers CLIPModel keys."""
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    required = ["visual.conv1.weight", "visual.proj", "text_projection", "token_embedding.weight", "logit_scale"]
    absent = [k for k in required if k not in sd]
    if absent:
        raise UserError(f"not an open_clip CLIP state dict: missing {absent}")
    out = {
        "logit_scale": sd["logit_scale"].reshape(()),
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_model.final_layer_norm.weight": sd["ln_final.weight"],
        "text_model.final_layer_norm.bias": sd["ln_final.bias"],
        "text_projection.weight": sd["text_projection"].t().contiguous(),
        "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": sd["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": sd["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": sd["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": sd["visual.ln_post.bias"],
        "visual_projection.weight": sd["visual.proj"].t().contiguous(),
    }
    n_text = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.resblocks."))
    n_vision = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("visual.transformer.resblocks."))
    for i in range(n_text):
        _block(f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}", sd, out)
    for i in range(n_vision):
        _block(f"visual.transformer.resblocks.{i}", f"vision_model.encoder.layers.{i}", sd, out)
    return out


def convert_hpsv2(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, config=None) -> Path:
    """HPS_v2.1_compressed.pt → a CLIPModel directory (save_pretrained) that `ClipReward("hpsv2.1", …)` loads."""
    from transformers import CLIPModel

    try:
        state = read_state_dict(checkpoint)
    except UserError as err:
        raise UserError(f"cannot read the HPSv2 checkpoint {str(checkpoint)!r}: {err}") from err
    model = CLIPModel(config or hpsv2_clip_config())
    converted = open_clip_to_hf(state)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise UserError(
            f"{str(checkpoint)!r} does not fit the CLIP config: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    out = Path(out_dir)
    model.save_pretrained(out)
    return out
