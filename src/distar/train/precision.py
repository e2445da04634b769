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

import contextlib

import torch
from torch import nn

# The layers whose weights bf16 autocast casts on every call (F.linear, F.conv2d); the norms run in fp32 under
# autocast from their own fp32 weights, so their weights are left as they are.
CAST_LAYERS = (nn.Linear, nn.Conv2d)


def cast_weights(module: nn.Module) -> list[nn.Parameter]:
    """The fp32 weights and biases of `module`'s Linear and Conv2d layers (each once)."""
    seen, out = set(), []
    for layer in module.modules():
        if isinstance(layer, CAST_LAYERS):
            for p in layer.parameters(recurse=False):
                if p.dtype == torch.float32 and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


@contextlib.contextmanager
def frozen_bf16_weights(module: nn.Module, enabled: bool = True):
    """While the block runs, `module`'s Linear and Conv2d weights are bf16 copies made here, once; on exit the fp32
    weights are back, untouched. Only for passes in which those weights take no gradient and do not change (a
    frozen network, or one under no_grad): the copies are what autocast would make, so outputs and the gradients
    to the inputs are those of autocast. The module's input dtype (`INPUT_DTYPE`) stays what it was."""
    params = cast_weights(module) if enabled else []
    if not params:
        yield
        return
    from distar.models.sdxl import INPUT_DTYPE

    masters = [p.data for p in params]
    copies = [torch.empty_like(m, dtype=torch.bfloat16) for m in masters]
    with torch.no_grad():
        torch._foreach_copy_(copies, masters)  # a few multi-tensor kernels instead of one cast per layer
    had = getattr(module, INPUT_DTYPE, None)
    setattr(module, INPUT_DTYPE, had or next(module.parameters()).dtype)
    try:
        for p, c in zip(params, copies, strict=True):
            p.data = c
        yield
    finally:
        for p, m in zip(params, masters, strict=True):
            p.data = m
        if had is None:
            delattr(module, INPUT_DTYPE)
        else:
            setattr(module, INPUT_DTYPE, had)


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
            layer.register_forward_pre_hook(_to_fp32)
            layer.register_forward_hook(_to_input_dtype)
            changed += 1
    return changed


def _to_fp32(layer, args):
    layer._distar_io_dtype = args[0].dtype
    return (args[0].float(), *args[1:])


def _to_input_dtype(layer, args, out):
    return out.to(layer._distar_io_dtype)
