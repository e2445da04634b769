"""Differentiable image preprocessing of the reward models, in torch, following each original exactly.

Every reward takes images as float tensors (B, 3, H, W) with values in [0, 1] (RGB).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from distar import diffusion

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def check_images_and_prompts(images: torch.Tensor, prompts: Sequence[str], tolerance: float = 1e-3) -> None:
    """ValueError naming the argument for the wrong type, shape, channel count, range or batch size."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise ValueError(f"images must be a float tensor (B, 3, H, W) in [0, 1], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W) (RGB), got {tuple(images.shape)}")
    if not diffusion.values_on_host(images):  # no host sync in the training loop (and "meta" has no values)
        lo, hi = 0.0, 1.0
    else:
        lo, hi = float(images.detach().min()), float(images.detach().max())
    if lo < -tolerance or hi > 1 + tolerance:
        raise ValueError(f"images must lie in [0, 1], got values in [{lo:.3f}, {hi:.3f}] (map [-1, 1] by x/2 + 0.5)")
    if isinstance(prompts, str) or len(prompts) != images.shape[0]:
        n = "a string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
        raise ValueError(f"prompts must be a list of one prompt per image: {images.shape[0]} images but {n}")


def resize_shortest_center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """CLIPImageProcessor: bicubic resize of the shortest side to `size` (antialiased, as PIL), centre crop."""
    h, w = images.shape[-2:]
    # transformers' get_resize_output_image_size: the long side is truncated, not rounded.
    nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    if (nh, nw) != (h, w):
        images = F.interpolate(images, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    return images[..., top : top + size, left : left + size]


def resize_longest_pad(images: torch.Tensor, size: int, fill: float = 0.0) -> torch.Tensor:
    """open_clip's ResizeMaxSize (HPSv2): bicubic resize of the longest side to `size`, centred zero padding."""
    h, w = images.shape[-2:]
    scale = size / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    if (nh, nw) != (h, w):
        images = F.interpolate(images, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    pad_h, pad_w = size - nh, size - nw
    return F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).reshape(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).reshape(1, 3, 1, 1)
    return (images - mean_t) / std_t
