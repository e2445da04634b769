"""Compute precision and layout beyond autocast: bf16 copies of weights that do not change, made once instead of
on every operation; channels_last; a low-precision VAE whose normalisation stays in fp32.

bf16 autocast casts every fp32 weight of a Linear or Conv2d layer to bf16 on each call (and again when activation
checkpointing recomputes a block): thousands of small copy kernels per UNet pass. Two passes of a DI* iteration
use weights that cannot change while they run: the generator's samples for the K_TA assistant updates (the
generator is only updated after them) and the frozen assistant inside the generator update. For those,
`frozen_bf16_weights` swaps in bf16 copies made once, with the rounding autocast would apply, so the results are
the same bits as under autocast.
"""

from __future__ import annotations

import torch
from torch import nn

from distar.backbones import shared
from distar.backbones.shared import CAST_LAYERS, cast_weights

__all__ = ["CAST_LAYERS", "cast_weights", "fp32_norms", "frozen_bf16_weights", "to_channels_last"]


def frozen_bf16_weights(module: nn.Module, enabled: bool = True):
    """While the block runs, `module`'s Linear and Conv2d weights are bf16 copies made once (its shared base's
    `compute_weights`): only for passes in which those weights take no gradient and do not change (a frozen
    network, or one under no_grad). The copies are what autocast would make, so outputs and the gradients to the
    inputs are those of autocast."""
    return shared.base(module).compute_weights(enabled)


def to_channels_last(*modules: nn.Module) -> None:
    """4-D weights in channels_last (NHWC) memory order: cuDNN's convolutions then read and write NHWC directly
    instead of converting layouts around each call. Parameter names, shapes and values stay the same."""
    for module in modules:
        module.to(memory_format=torch.channels_last)


def fp32_norms(vae: nn.Module) -> int:
    """Keep the GroupNorm layers of a low-precision VAE in fp32: each casts its input up, normalises with fp32
    weights, and hands the next layer its own input dtype. Returns the number of layers changed."""
    changed = 0
    for layer in vae.modules():
        if isinstance(layer, nn.GroupNorm) and layer.weight is not None and layer.weight.dtype != torch.float32:
            layer.float()
            cast = _Fp32Norm()
            layer.register_forward_pre_hook(cast.enter)
            layer.register_forward_hook(cast.leave)
            changed += 1
    return changed


class _Fp32Norm:
    """The hooks of one fp32 norm layer: the input dtype of each call in flight, on a stack (a recompute under
    activation checkpointing enters and leaves like any call)."""

    def __init__(self):
        self.dtypes: list[torch.dtype] = []

    def enter(self, layer, args):
        self.dtypes.append(args[0].dtype)
        return (args[0].float(), *args[1:])

    def leave(self, layer, args, out):
        return out.to(self.dtypes.pop())
