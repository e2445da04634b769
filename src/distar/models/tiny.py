"""The `tiny` preset: an SDXL-shaped model family with random weights, small enough for a CPU test.

Same classes and the same on-disk layout as stabilityai/stable-diffusion-xl-base-1.0 (written with
save_pretrained), so the real loaders read it: UNet with text_time micro-conditioning, two CLIP text
encoders (the second with projection), their tokenizers, a VAE, a scheduler. Hidden sizes 32 + 32
make cross_attention_dim 64; the VAE downsamples by 2 (SDXL: 8), so 32×32 latents decode to 64×64.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

TINY_MAX_LENGTH = 77
TINY_TEXT_HIDDEN = 32
TINY_TIME_EMBED_DIM = 8


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def write_tiny_clip_tokenizer(out_dir: str | os.PathLike) -> Path:
    """A byte-level CLIP BPE tokenizer with no merges: every character is a token. Real CLIPTokenizer files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n")
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=TINY_MAX_LENGTH)
    tok.save_pretrained(out)
    return out


def tiny_text_config(vocab_size: int, bos: int, eos: int, with_projection: bool):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TINY_TEXT_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=TINY_MAX_LENGTH,
        projection_dim=TINY_TEXT_HIDDEN,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
        hidden_act="gelu",
    )


def tiny_unet_config() -> dict:
    """The SDXL UNet's structure in miniature (ECOSYSTEM.md's tested shape)."""
    return dict(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        cross_attention_dim=2 * TINY_TEXT_HIDDEN,
        norm_num_groups=32,
        addition_embed_type="text_time",
        addition_time_embed_dim=TINY_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TINY_TIME_EMBED_DIM + TINY_TEXT_HIDDEN,
        use_linear_projection=True,
    )


def build_tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**tiny_unet_config())


def build_tiny_sdxl(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a complete tiny StableDiffusionXLPipeline directory (hub layout) and return its path."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    out = Path(out_dir)
    tok_dir = write_tiny_clip_tokenizer(out / "_tokenizer_build")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(tiny_text_config(len(tokenizer), bos, eos, False))
    text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(len(tokenizer), bos, eos, True))
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=64,
        scaling_factor=0.13025,
    )
    unet = build_tiny_unet(seed)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        timestep_spacing="leading",
        steps_offset=1,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
    )
    pipe.save_pretrained(out)
    for name in ("vocab.json", "merges.txt"):
        (tok_dir / name).unlink(missing_ok=True)
    for leftover in tok_dir.iterdir():
        leftover.unlink()
    tok_dir.rmdir()
    return out
