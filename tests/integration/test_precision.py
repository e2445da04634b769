"""Precision and layout options of the trainer on the tiny preset: bf16 weight copies made once compute the bits
bf16 autocast computes; channels_last computes what the default layout computes; fused AdamW skips a non-finite
update on the device and a common step reads nothing back to the host; the bf16 VAE with fp32 norms stays within
its error bound of fp32."""

from __future__ import annotations

import traceback

import pytest
import torch

from distar import tiny_preset
from distar.errors import UserError
from distar.train import distributed
from distar.train.config import load_config
from distar.train.trainer import Trainer

ONE_PROCESS = ["parallel.strategy=none", "log.progress=false", "log.tensorboard=false", "log.every=1000"]


@pytest.fixture
def trainer_of(tmp_path):
    """Build Trainers in this process (a world of one, shut down after the test)."""
    made = []

    def build(*overrides: str) -> Trainer:
        config = load_config("tiny", [f"out={tmp_path / f'run{len(made)}'}", *ONE_PROCESS, *overrides])
        tiny_preset.prepare(config.to_dict())
        trainer = Trainer(config, distributed.init("cpu", "gloo"))
        made.append(trainer)
        return trainer

    yield build
    distributed.shutdown()


def _steps(trainer: Trainer, n: int) -> list[dict[str, float]]:
    from distar.train.trainer import host_values

    return [host_values({k: v for k, v in trainer.train_step().items() if not k.startswith("ok/")}) for _ in range(n)]


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    out = {f"g.{k}": v.detach().clone() for k, v in trainer.nets.generator_unet.named_parameters()}
    out.update({f"a.{k}": v.detach().clone() for k, v in trainer.nets.assistant_unet.named_parameters()})
    return out


BF16 = ["parallel.mixed_precision=bf16", "assistant_updates=2", "parallel.activation_checkpointing=true"]


def test_bf16_weight_copies_compute_the_bits_autocast_computes(trainer_of):
    plain = trainer_of(*BF16)
    copies = trainer_of(*BF16, "parallel.bf16_weight_copies=true")
    assert _steps(plain, 2) == _steps(copies, 2)  # every loss, norm and reward, to the last bit
    a, b = _weights(plain), _weights(copies)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the fp32 master weights are back after each pass, and nothing of the copies is left on the UNets
    assert all(p.dtype == torch.float32 for p in copies.nets.generator_unet.parameters())
    assert all(p.dtype == torch.float32 for p in copies.nets.assistant_unet.parameters())


def test_bf16_weight_copies_are_made_once_for_the_k_ta_samples(trainer_of, monkeypatch):
    from distar.train import precision

    trainer = trainer_of(*BF16, "parallel.bf16_weight_copies=true")
    made = []
    real = torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_", lambda dst, src: (made.append(len(dst)), real(dst, src))[1])
    trainer.train_step()
    # one copy of the generator for both assistant updates, one of the frozen assistant for the generator update
    generator_layers = len(precision.cast_weights(trainer.nets.generator_unet))
    assistant_layers = len(precision.cast_weights(trainer.nets.assistant_unet))
    assert made == [generator_layers, assistant_layers]


def test_bf16_weight_copies_need_autocast_without_fsdp():
    with pytest.raises(UserError, match="parallel.bf16_weight_copies"):
        load_config("tiny", ["parallel.bf16_weight_copies=true"])  # the tiny preset computes in fp32
    with pytest.raises(UserError, match="parallel.bf16_weight_copies"):
        load_config(
            "tiny", ["parallel.bf16_weight_copies=true", "parallel.mixed_precision=bf16", "parallel.strategy=fsdp"]
        )


def test_channels_last_computes_what_the_default_layout_computes(trainer_of):
    plain = trainer_of()
    nhwc = trainer_of("parallel.channels_last=true")
    conv = nhwc.nets.generator_unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert nhwc.nets.vae.decoder.conv_out.weight.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(_steps(plain, 2), _steps(nhwc, 2), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


OVERFLOW = 'reward.weights={"pickscore": 1e38}'  # a finite weight whose reward term overflows fp32 (α_rew = 100)


@pytest.mark.parametrize("implementation", ["fused", "foreach"])
def test_a_non_finite_update_is_skipped_and_counted_with_either_adamw(trainer_of, implementation):
    trainer = trainer_of(
        OVERFLOW,
        "max_nonfinite=100",
        f"generator_optim.implementation={implementation}",
        f"assistant_optim.implementation={implementation}",
    )
    before = _weights(trainer)
    state = trainer.optimizers["generator"].state
    _steps(trainer, 2)
    after = _weights(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("g."))  # the generator never moved
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("a."))  # the assistant did
    assert all(float(s["step"]) == 0 for s in state.values())  # fused AdamW took its step back
    assert trainer.skipped() == {"generator": 2, "assistant": 0}


def test_fused_adamw_aborts_at_the_first_count_after_max_nonfinite(trainer_of):
    from distar.train.trainer import NonFiniteError

    trainer = trainer_of(OVERFLOW, "max_nonfinite=2", "assistant_updates=0",
                         "generator_optim.implementation=fused")  # fmt: skip
    trainer.train_step()
    trainer.train_step()  # the verdicts wait on the device ...
    with pytest.raises(NonFiniteError, match="2 non-finite updates in a row"):
        trainer.settle()  # ... until the loop counts them (log and checkpoint steps, the end)


def test_the_loops_common_steps_read_nothing_back(trainer_of, monkeypatch):
    """With the default optimizer and EMA on, the loop's common steps (neither log, sample nor checkpoint steps)
    leave the values, gradient norms, finite checks, skips and EMA on the device: on a GPU every read stalls the
    host until the queue drains. The CPU stands in for the device: the value checks that read CPU tensors
    (`values_on_host`) are told every tensor lives on an accelerator, as on a GPU."""
    from distar import diffusion

    trainer = trainer_of("steps=5", "ema_decay=0.9", "assistant_updates=2", "log.every=4", "log.sample_every=1000",
                         "checkpoint.every=1000")  # fmt: skip
    assert all(o.defaults.get("fused") for o in trainer.optimizers.values())  # what "auto" chooses here
    monkeypatch.setattr(diffusion, "values_on_host", lambda t: False)
    reads = []

    def record(name, real):
        def read(self, *args):
            frames = [f.filename for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename]
            reads.append((name, frames[-1], trainer.step))
            return real(self, *args)

        return read

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__format__"):
        monkeypatch.setattr(torch.Tensor, name, record(name, getattr(torch.Tensor, name)))
    ema_before = {k: v.clone() for k, v in trainer.ema.items()}
    summary = trainer.fit()
    monkeypatch.undo()
    ours = [r for r in reads if "/distar/" in r[1]]
    # Steps 2 and 3 run with the counter at 1 and 2 (step 4 measures the balance for its log step; step 1 builds
    # the optimizer states): none of distar's code reads there.
    assert [r for r in ours if r[2] in (1, 2)] == []
    assert any(r[2] == 4 for r in ours)  # the log step reads its values: the recorder sees distar's reads
    # what is left in common steps is the reward's text tower: transformers checks its attention mask on the host
    assert all("transformers/masking_utils" in where for _, where, step in reads if step in (1, 2)), reads
    assert summary["step"] == 5 and summary["skipped"] == {"generator": 0, "assistant": 0}
    assert any(not torch.equal(ema_before[k], v) for k, v in trainer.ema.items())  # the EMA followed on the device


def test_the_bf16_vae_with_fp32_norms_decodes_within_its_bound(tiny_sdxl):
    from distar.backbones.sdxl import decode, load_vae
    from distar.train.precision import fp32_norms

    reference = load_vae(tiny_sdxl, dtype="fp32")
    vae = load_vae(tiny_sdxl, dtype="bf16")
    changed = fp32_norms(vae)
    norms = [m for m in vae.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert changed == len(norms) > 0 and all(m.weight.dtype == torch.float32 for m in norms)
    seen = []
    norms[-1].register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    x0 = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
    want = decode(reference, x0)
    got = decode(vae, x0)
    assert seen == [(torch.float32, torch.bfloat16)]  # normalised from an fp32 input; the next layer gets bf16
    assert got.dtype == torch.float32 and vae.decoder.conv_out.weight.dtype == torch.bfloat16
    # the bound of docs/PERFORMANCE.md: mean absolute pixel error under 1/255 and the reward gradient's direction
    assert (got - want).abs().mean() < 1 / 255
    g = torch.rand_like(want)
    (grad_want,) = torch.autograd.grad((want * g).sum(), x0)
    (grad_got,) = torch.autograd.grad((got * g).sum(), x0)
    assert torch.nn.functional.cosine_similarity(grad_got.flatten(), grad_want.flatten(), dim=0) > 0.99


def test_every_attention_runs_through_scaled_dot_product_attention(trainer_of):
    """SDPA is what dispatches to flash / memory-efficient kernels on a GPU: every attention of the UNets and the
    VAE uses diffusers' SDPA processor, and the reward's CLIP towers transformers' SDPA implementation, also on
    the LoRA-adapted shared UNet."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    trainer = trainer_of("model.assistant=lora", "model.assistant_lora_rank=4", "model.generator=lora")
    nets = trainer.nets
    modules = [nets.generator_unet, nets.reference.unet, nets.vae]
    attentions = [m for module in modules for m in module.modules() if isinstance(m, Attention)]
    assert attentions and all(isinstance(a.processor, AttnProcessor2_0) for a in attentions)
    reward_configs = [
        m.config for m in nets.reward.modules() if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")
    ]
    assert reward_configs and all(c._attn_implementation == "sdpa" for c in reward_configs)
