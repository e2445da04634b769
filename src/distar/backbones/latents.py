"""Latents ↔ images through an AutoencoderKL, as every family's pipeline does it: the network's latents are the
VAE's, shifted by `shift_factor` (SD3's VAE: 0.0609; SDXL's has none) and scaled by `scaling_factor`
(SDXL 0.13025, SD3 1.5305), i.e. z_net = (z_vae − shift)·scale."""

from __future__ import annotations

import contextlib

import torch


def _shift(vae) -> float:
    return float(getattr(vae.config, "shift_factor", None) or 0.0)


def decode(vae, x0: torch.Tensor) -> torch.Tensor:
    """Differentiable VAE decode of latents x0 to images in [0, 1], shape (B, 3, H, W), in x0's dtype.

    Pixels are clamped to [0, 1] (the reward models' input range), so gradients vanish only where a pixel is
    already out of range.
    """
    vae_dtype = next(vae.parameters()).dtype
    latents = (x0 / vae.config.scaling_factor + _shift(vae)).to(vae_dtype)
    # The decoder runs in its own weights' dtype (model.vae_dtype), also inside the trainer's bf16 autocast region:
    # the SDXL VAE is kept in fp32 because lower precision overflows.
    own_dtype = (
        torch.autocast(latents.device.type, enabled=False)
        if latents.device.type in ("cpu", "cuda")
        else contextlib.nullcontext()  # "meta" (distar plan's shape-only runs) has no autocast
    )
    with own_dtype:
        images = vae.decode(latents).sample
    return (images.float() / 2 + 0.5).clamp(0, 1).to(x0.dtype)


def encode(vae, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Images in [0, 1] → latents sampled from the VAE posterior, shifted and scaled as the networks take them."""
    vae_dtype = next(vae.parameters()).dtype
    dist = vae.encode((images * 2 - 1).to(vae_dtype)).latent_dist
    return ((dist.sample(generator) - _shift(vae)) * vae.config.scaling_factor).to(images.dtype)
