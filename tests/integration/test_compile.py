"""Regional compilation (parallel.compile): each UNet block compiled in place computes what the eager block
computes, forward and backward, and keeps the parameter names checkpoints use."""

from __future__ import annotations

import copy

import pytest
import torch

from distar import backbones
from distar.backbones.sdxl import PromptEncoder, load_unet
from distar.train import parallel

SDXL = backbones.get("sdxl")


@pytest.mark.slow
def test_compiled_unet_blocks_match_eager_forward_and_backward(tiny_sdxl):
    cond = PromptEncoder.from_pretrained(tiny_sdxl).encode(["a red cube", "a horse"], height=64, width=64)
    eager = load_unet(tiny_sdxl)
    compiled = copy.deepcopy(eager)
    names = [n for n, _ in compiled.named_parameters()]
    # one cross-attention block (attention, norms, resnets: what compilation fuses), to keep inductor's CPU compile
    # to seconds; parallel.compile_regions does every block the same way
    blocks = [b for b in parallel.block_modules(SDXL, compiled) if getattr(b, "has_cross_attention", False)]
    blocks[0].compile()
    assert [n for n, _ in compiled.named_parameters()] == names  # checkpoints and optimizer states unchanged
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 32, 32, generator=g)
    t = torch.tensor([300, 800])
    outputs = []
    for unet in (eager, compiled):
        xi = x.clone().requires_grad_(True)
        out = unet(xi, t, **cond.unet_kwargs()).sample
        out.square().mean().backward()
        outputs.append((out.detach(), xi.grad, {n: p.grad for n, p in unet.named_parameters()}))
    (e_out, e_dx, e_dw), (c_out, c_dx, c_dw) = outputs
    torch.testing.assert_close(c_out, e_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(c_dx, e_dx, rtol=1e-3, atol=1e-6)
    for name in e_dw:
        torch.testing.assert_close(c_dw[name], e_dw[name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.slow
def test_a_compiled_block_follows_the_bf16_weight_copies_and_back(tiny_sdxl):
    """The frozen passes swap bf16 copies into the fp32 weights (parallel.bf16_weight_copies): a compiled block
    must compute with the copies while they are in, and with the fp32 weights again after, as eager does."""
    from distar.train.precision import frozen_bf16_weights

    cond = PromptEncoder.from_pretrained(tiny_sdxl).encode(["a red cube", "a horse"], height=64, width=64)
    eager = load_unet(tiny_sdxl)
    compiled = copy.deepcopy(eager)
    [b for b in parallel.block_modules(SDXL, compiled) if getattr(b, "has_cross_attention", False)][0].compile()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 32, 32, generator=g), torch.tensor([300, 800])
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)

    def frozen(unet):
        with torch.no_grad(), frozen_bf16_weights(unet), autocast:
            return unet(x, t, **cond.unet_kwargs()).sample.float()

    def trained(unet):
        with autocast:
            out = unet(x, t, **cond.unet_kwargs()).sample.float()
        out.square().mean().backward()
        return out.detach(), {n: p.grad for n, p in unet.named_parameters()}

    torch.testing.assert_close(frozen(compiled), frozen(eager), rtol=2e-2, atol=2e-2)  # bf16 kernels
    (c_out, c_dw), (e_out, e_dw) = trained(compiled), trained(eager)
    assert all(p.dtype == torch.float32 for p in compiled.parameters())
    torch.testing.assert_close(c_out, e_out, rtol=2e-2, atol=2e-2)
    for name in e_dw:
        torch.testing.assert_close(c_dw[name], e_dw[name], rtol=5e-2, atol=5e-3, msg=name)
