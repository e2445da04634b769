"""The LoRA assistant (model.assistant = "lora"): one UNet serves the reference (adapters off) and the assistant
(adapters on). Off, it is the reference exactly; zero-initialised and on, it is the reference too at step 0; with
activation checkpointing, every recompute runs with the adapters as they were in its forward."""

import copy

import pytest
import torch
import torch.utils.checkpoint

from distar import backbones
from distar.backbones import Assistant, Reference
from distar.backbones.sdxl import SDXL, PromptEncoder, load_unet
from distar.backbones.shared import adapter_parameters, add_assistant_adapter
from distar.errors import UserError
from distar.train import parallel

PROMPTS = ["a red cube on a blue sphere", "an astronaut riding a horse"]


@pytest.fixture(scope="module")
def setup(tiny_sdxl):
    cond = PromptEncoder.from_pretrained(tiny_sdxl).encode(PROMPTS, height=64, width=64)
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 4, 32, 32, generator=g)
    t = torch.tensor([250, 700])
    return tiny_sdxl, cond, x_t, t


def _shared(tiny_sdxl, rank=4):
    plain = load_unet(tiny_sdxl)
    unet = copy.deepcopy(plain)
    reference = Reference(unet, guidance_scale=7.5)
    assistant = Assistant(add_assistant_adapter(unet, SDXL.lora_targets, rank=rank, alpha=rank))
    return Reference(plain, guidance_scale=7.5), reference, assistant


def test_adapters_off_is_the_reference_and_zero_init_adapters_on_are_too(setup):
    tiny_sdxl, cond, x_t, t = setup
    plain, reference, assistant = _shared(tiny_sdxl)
    with torch.no_grad():
        want_cfg, want_cond = plain(x_t, t, cond), plain(x_t, t, cond, guidance_scale=1.0)
        torch.testing.assert_close(reference(x_t, t, cond), want_cfg, rtol=0, atol=0)
        torch.testing.assert_close(assistant(x_t, t, cond), want_cond, rtol=0, atol=0)  # B = 0 at step 0
        for p in adapter_parameters(assistant.unet):
            p.add_(0.05 * torch.randn_like(p))
        moved = assistant(x_t, t, cond)
        assert (moved - want_cond).abs().max() > 1e-3  # the adapters act when on ...
        torch.testing.assert_close(reference(x_t, t, cond), want_cfg, rtol=0, atol=0)  # ... and only then


def test_only_the_adapters_train(setup):
    tiny_sdxl, *_ = setup
    _, reference, assistant = _shared(tiny_sdxl, rank=4)
    trainable = assistant.trainable()
    assert trainable and all(p.requires_grad and p.dtype == torch.float32 for p in trainable)
    frozen = [p for n, p in reference.unet.named_parameters() if ".lora_" not in n]
    assert frozen and not any(p.requires_grad for p in frozen)
    assert sum(p.numel() for p in trainable) < 0.05 * sum(p.numel() for p in frozen)


def _grads(reference, assistant, x_t, t, cond):
    x = x_t.clone().requires_grad_(True)
    loss = (reference(x, t, cond) - assistant(x, t, cond)).square().mean()  # both in one graph, as in L_G
    loss.backward()
    out = [x.grad.clone()] + [p.grad.clone() for p in assistant.trainable()]
    for p in assistant.trainable():
        p.grad = None
    return out


def test_checkpointed_recompute_keeps_each_forwards_adapter_state(setup):
    tiny_sdxl, cond, x_t, t = setup
    _, reference, assistant = _shared(tiny_sdxl)
    with torch.no_grad():
        for p in adapter_parameters(assistant.unet):
            p.add_(0.05 * torch.randn_like(p, generator=torch.Generator().manual_seed(1)))
    eager = _grads(reference, assistant, x_t, t, cond)
    parallel.apply_activation_checkpointing(backbones.get("sdxl"), reference.unet)  # one UNet, both roles
    assert any(isinstance(m, parallel.AdapterStateCheckpoint) for m in reference.unet.modules())
    checkpointed = _grads(reference, assistant, x_t, t, cond)
    for a, b in zip(eager, checkpointed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # the plain wrapper recomputes with whatever state the adapters were left in: torch's checkpoint sees a
    # different graph in the recompute and refuses
    _, reference2, assistant2 = _shared(tiny_sdxl)
    with torch.no_grad():
        for p, q in zip(adapter_parameters(assistant2.unet), adapter_parameters(assistant.unet), strict=True):
            p.copy_(q)
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for parent, key in backbones.get("sdxl").blocks(reference2.unet):
        parallel._set(parent, key, checkpoint_wrapper(parallel._get(parent, key)))
    with pytest.raises(torch.utils.checkpoint.CheckpointError):
        _grads(reference2, assistant2, x_t, t, cond)


def _generator_update_grad(reference, assistant, x_t, t, cond, order: str, copies: bool) -> torch.Tensor:
    """∂/∂x_t of a loss over the shared network's passes in `order`, as the generator update runs them: the
    assistant frozen, under bf16 autocast, with bf16 compute weights made once around them (`copies`)."""
    from distar.train import precision

    x = x_t.clone().requires_grad_(True)
    for p in assistant.trainable():
        p.requires_grad_(False)
    try:
        with precision.frozen_bf16_weights(assistant.unet, copies), torch.autocast("cpu", dtype=torch.bfloat16):
            calls = {
                "assistant": lambda: assistant(x, t, cond),
                "reference": lambda: reference(x, t, cond),
                "branches": lambda: torch.cat(reference.branches(x, t, cond)),
            }
            outs = [calls[name]().float() for name in order.split("+")]
            loss = sum((o * (i + 1)).square().mean() for i, o in enumerate(outs))
        (grad,) = torch.autograd.grad(loss, x)
    finally:
        for p in assistant.trainable():
            p.requires_grad_(True)
    return grad


ORDERS = ["assistant+reference", "reference+assistant", "assistant+branches", "branches+assistant+reference"]


@pytest.mark.parametrize("order", ORDERS)
def test_copies_adapter_switches_and_recomputes_in_the_trainers_orders(setup, order):
    tiny_sdxl, cond, x_t, t = setup
    _, reference, assistant = _shared(tiny_sdxl)
    with torch.no_grad():
        for p in adapter_parameters(assistant.unet):
            p.add_(0.05 * torch.randn_like(p, generator=torch.Generator().manual_seed(2)))
    state = reference.base
    flags = [p.requires_grad for p in reference.unet.parameters()]
    weights = [(p.data_ptr(), p.dtype) for p in reference.unet.parameters()]
    eager = _generator_update_grad(reference, assistant, x_t, t, cond, order, copies=False)
    copied = _generator_update_grad(reference, assistant, x_t, t, cond, order, copies=True)
    parallel.apply_activation_checkpointing(backbones.get("sdxl"), reference.unet)
    recomputed = _generator_update_grad(reference, assistant, x_t, t, cond, order, copies=True)
    torch.testing.assert_close(copied, eager, rtol=0, atol=0)  # the copies are autocast's own rounding
    torch.testing.assert_close(recomputed, eager, rtol=0, atol=0)  # each recompute saw its forward's adapters
    # and afterwards: adapters off, fp32 weights back (the same storage), the loop's requires_grad flags untouched
    assert state.adapters_on is False and state.input_dtype is None
    assert [p.requires_grad for p in reference.unet.parameters()] == flags
    assert [(p.data_ptr(), p.dtype) for p in reference.unet.parameters()] == weights
    # the assistant's own update (adapters on, trainable) recomputes to the eager gradients too
    eager_update = _grads(*_shared_copy(tiny_sdxl, assistant), x_t, t, cond)
    for a, b in zip(eager_update, _grads(reference, assistant, x_t, t, cond), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def _shared_copy(tiny_sdxl, assistant):
    """A fresh shared network, not checkpointed, with `assistant`'s adapter weights."""
    _, reference, twin = _shared(tiny_sdxl)
    with torch.no_grad():
        for p, q in zip(adapter_parameters(twin.unet), adapter_parameters(assistant.unet), strict=True):
            p.copy_(q)
    return reference, twin


def test_config_rules(tiny_sdxl):
    from distar.train.config import load_config

    base = ["data.prompts=gs://b/p", "model.assistant=lora"]
    assert load_config("sdxl", base).parallel.strategy == "fsdp"  # FSDP2 shards the LoRA network as one
    with pytest.raises(UserError, match="assistant_init must be 'reference'"):
        load_config("sdxl", [*base, "parallel.strategy=none", "model.assistant_init=org/unet"])
    c = load_config("sdxl-1gpu", ["data.prompts=gs://b/p"])
    assert c.model.assistant == "lora" and c.parallel.strategy == "none" and c.data.resolution == 1024


def test_sdxl_1gpu_fits_one_80_gb_gpu_and_the_full_assistant_does_not():
    from distar.plan import GiB, plan
    from distar.train.config import load_config

    one = plan(load_config("sdxl-1gpu", ["data.prompts=gs://b/p"]), world_size=1)
    full = plan(load_config("sdxl", ["data.prompts=gs://b/p", "parallel.strategy=none"]), world_size=1)
    assert one["peak_bytes"] / GiB < 79.6 < full["peak_bytes"] / GiB
    # the difference is one UNet's fp32 weights and AdamW states, less the adapters'
    p_unet, p_lora = one["parameters"]["unet"], one["parameters"]["assistant"]
    assert 0 < p_lora < 0.05 * p_unet
    saved = sum(full["static"].values()) - sum(one["static"].values())
    assert saved == pytest.approx(3 * 4 * (p_unet - p_lora), rel=1e-6)


def test_a_lora_generator_saves_its_fp32_weights_gradients_and_adamw_states():
    from distar.plan import plan
    from distar.train.config import load_config

    full = plan(load_config("sdxl-1gpu", ["data.prompts=gs://b/p"]), world_size=1)
    lora = plan(load_config("sdxl-1gpu", ["data.prompts=gs://b/p", "model.generator=lora"]), world_size=1)
    p_unet, p_lora = lora["parameters"]["unet"], lora["parameters"]["generator"]
    assert 0 < p_lora < 0.05 * p_unet
    # fp32 weights, two AdamW states and the EMA (the preset keeps one) of a UNet become the adapters', and the
    # frozen base is kept in bf16
    assert load_config("sdxl-1gpu", ["data.prompts=gs://b/p"]).ema_decay > 0
    saved = sum(full["static"].values()) - sum(lora["static"].values())
    assert saved == pytest.approx(4 * 4 * (p_unet - p_lora) - 2 * p_unet, rel=1e-6)
    assert lora["gradients (one UNet)"] == pytest.approx(4 * p_lora)
    assert lora["peak_bytes"] < full["peak_bytes"]
    with pytest.raises(UserError, match="model.generator_lora_rank must be at least 1"):
        load_config("sdxl-1gpu", ["data.prompts=gs://b/p", "model.generator=lora", "model.generator_lora_rank=0"])


def test_ddp_all_reduces_only_what_trains():
    from distar.plan import communication_bytes
    from distar.train.config import load_config

    c = load_config("sdxl", ["data.prompts=gs://b/p", "parallel.strategy=ddp", "model.generator=lora"])
    full = communication_bytes(c, 2_000, 1_000, world_size=8)
    lora = communication_bytes(c, 2_000, 1_000, world_size=8, p_generator=50)
    assert full["generator update"] == pytest.approx(2 * 7 / 8 * 4 * 2_000)
    assert lora["generator update"] == pytest.approx(2 * 7 / 8 * 4 * 50)
    assert lora["assistant updates"] == full["assistant updates"] == pytest.approx(5 * 2 * 7 / 8 * 4 * 1_000)


def test_fsdp_gathers_the_frozen_base_and_reduce_scatters_only_what_trains():
    """Under FSDP2 a LoRA network all-gathers its bf16 base like a full one, but only its adapters' fp32 gradients
    are reduce-scattered."""
    from distar.plan import communication_bytes
    from distar.train.config import load_config

    c = load_config("sdxl", ["data.prompts=gs://b/p", "model.generator=lora", "model.assistant=lora"])
    assert c.parallel.strategy == "fsdp"
    p, p_g, p_a, k, ring = 2_000, 50, 30, c.assistant_updates, 7 / 8
    lora = communication_bytes(c, p, p_a, world_size=8, p_generator=p_g)
    assert lora["generator update"] == pytest.approx(ring * (6 * 2 * p + 4 * p_g))
    assert lora["assistant updates"] == pytest.approx(k * ring * (3 * 2 * p + 4 * p_a))
