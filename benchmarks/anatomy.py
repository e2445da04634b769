"""The DI* iteration taken apart: the trainer's own updates timed whole, each network pass timed alone.

Shared by `make bench` (CPU presets) and benchmarks/gpu_sdxl_step.py. The networks are the trainer's
(`assemble` over random weights of a real architecture), the prompts a Parquet shard of random text embeddings,
so nothing is downloaded and the text encoders are not in the loop (as in training on cached embeddings).

Parts of the assistant update (×K_TA per iteration): the generator's sample x0 (no gradient), the assistant's
denoising loss forward and backward, the optimizer (clip, finite check, AdamW). Parts of the generator update:
the generator forward and backward, the VAE decode and the reward with the backward to their inputs, the frozen
assistant and the CFG reference (2B) with the backward to x_t, the optimizer. Once per iteration: the prompt
batch (its rows and conditioning).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from distar.backbones.sdxl import decode
from distar.losses import assistant_loss
from distar.models.architectures import Architecture, random_networks
from distar.train import distributed
from distar.train.config import load_config
from distar.train.data import PromptSet, write_embedding_shard
from distar.train.distributed import World
from distar.train.networks import assemble
from distar.train.trainer import Trainer

ASSISTANT_PARTS = ("generator sample (no grad)", "assistant DSM fwd+bwd", "optimizer (assistant)")
GENERATOR_PARTS = ("generator fwd+bwd", "VAE decode fwd+bwd", "reward fwd+bwd", "assistant fwd+bwd(x_t)",
                   "reference CFG 2B fwd+bwd(x_t)", "optimizer (generator)")  # fmt: skip


def build_trainer(
    arch: Architecture,
    preset: str,
    overrides: list[str],
    workdir: Path,
    device: str = "cpu",
    world: World | None = None,
    n_prompts: int = 16,
) -> Trainer:
    """A Trainer over random networks of `arch` and a shard of random prompt embeddings."""
    shard = workdir / "prompts" / "part-00000.parquet"
    config = load_config(
        preset,
        [
            f"out={workdir / 'run'}",
            f"data.prompts={shard.parent}",
            "log.tensorboard=false",
            "log.progress=false",
            "log.every=1000000000",  # the common step: the balance measurement of log steps is not part of it
            *overrides,
        ],
    )
    world = world or distributed.init(device)
    if not shard.exists():
        g = torch.Generator().manual_seed(0)
        shapes = arch.family.embedding_shapes(arch.unet)
        columns = {name: torch.randn(n_prompts, *shapes[name], generator=g) for name in arch.family.embedding_columns}
        write_embedding_shard(str(shard), [f"prompt {i}" for i in range(n_prompts)], columns)
    data = PromptSet(str(shard.parent), embedding_columns=arch.family.embedding_columns)
    nets = assemble(config, world, **random_networks(arch, next(iter(config.reward.weights)), world.device))
    return Trainer(config, world, data=data, nets=nets)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _zero_grads(trainer: Trainer) -> None:
    trainer.optimizers["generator"].zero_grad(set_to_none=True)
    trainer.optimizers["assistant"].zero_grad(set_to_none=True)


def _fill_grads(unet: torch.nn.Module) -> None:
    for p in unet.parameters():
        if p.requires_grad:
            p.grad = torch.full_like(p, 1e-6)


class _FrozenAssistant:
    """The assistant's parameters without gradients, as in the generator update."""

    def __init__(self, trainer: Trainer):
        self.unet = trainer.nets.assistant_unet

    def __enter__(self):
        self.unet.requires_grad_(False)

    def __exit__(self, *exc):
        self.unet.requires_grad_(True)


def parts(trainer: Trainer, batches: list) -> dict[str, tuple[Callable, Callable | None]]:
    """name → (timed function, untimed set-up run before it) for every part of one iteration (first micro-batch)."""
    _, batch, cond = batches[0]
    nets, ac, schedule, L = trainer.nets, trainer.autocast, trainer.schedule, trainer.config.loss
    device, n = trainer.world.device, len(batch.prompts)
    g = torch.Generator().manual_seed(1)
    z = torch.randn((n, *trainer.latent_shape), generator=g).to(device)
    eps = torch.randn((n, *trainer.latent_shape), generator=g).to(device)
    t = torch.randint(L.t_min, L.t_max, (n,), generator=g).to(device)
    generator = nets.generator
    with torch.no_grad(), ac:
        x0 = generator(z, cond).float()
        images = decode(nets.vae, x0).float()
    x_t = schedule.add_noise(x0, eps, t)
    cotangent = torch.randn(x0.shape, generator=g).to(device) * 1e-3
    image_cotangent = torch.randn(images.shape, generator=g).to(device) * 1e-3

    def generator_sample():
        with torch.no_grad(), ac:
            generator(z, cond)

    def assistant_dsm():
        with ac:
            assistant_loss(nets.assistant_train(x_t, t, cond).float(), eps).backward()

    def generator_fwd_bwd():
        with ac:
            nets.generator_train(z, cond).float().backward(cotangent)

    def vae_decode():
        x = x0.detach().requires_grad_()
        with ac:
            decode(nets.vae, x).float().backward(image_cotangent)

    def reward():
        im = images.detach().requires_grad_()
        with ac:
            nets.reward.combine(nets.reward.terms(im, batch.prompts)).float().sum().backward()

    def through_input(network):
        def run():
            x = x_t.detach().requires_grad_()
            with _FrozenAssistant(trainer), ac:
                network(x, t, cond).float().backward(cotangent)

        return run

    def optimizer(name):
        return lambda: trainer._apply(name, 0.0, 0)

    assistant_fns = [
        (generator_sample, None),
        (assistant_dsm, None),
        (optimizer("assistant"), lambda: _fill_grads(nets.assistant_unet)),
    ]
    generator_fns = [
        (generator_fwd_bwd, None),
        (vae_decode, None),
        (reward, None),
        (through_input(nets.assistant), None),
        (through_input(nets.reference), None),
        (optimizer("generator"), lambda: _fill_grads(nets.generator_unet)),
    ]
    fns = dict(zip(ASSISTANT_PARTS, assistant_fns, strict=True))
    fns.update(zip(GENERATOR_PARTS, generator_fns, strict=True))
    if nets.reward is None:
        del fns["reward fwd+bwd"], fns["VAE decode fwd+bwd"]
    return fns


def _timed(fn: Callable, setup: Callable | None, trainer: Trainer) -> float:
    _zero_grads(trainer)
    if setup is not None:
        setup()
    synchronize(trainer.world.device)
    start = time.perf_counter()
    fn()
    synchronize(trainer.world.device)
    elapsed = time.perf_counter() - start
    _zero_grads(trainer)
    return elapsed


def anatomy(trainer: Trainer, repeats: int = 5) -> dict:
    """Median seconds of the whole updates and of each part, measured in interleaved rounds (drift hits both)."""
    batches = trainer.method.micro_batches(trainer.samples_seen)
    fns = parts(trainer, batches)
    whole = {
        "iteration": (trainer.train_step, None),
        "assistant update": (lambda: trainer.assistant_update(0, batches), None),
        "generator update": (lambda: trainer.generator_update(batches), None),
    }
    fns["prompt batch"] = (lambda: trainer.method.micro_batches(trainer.samples_seen), None)
    samples: dict[str, list[float]] = {name: [] for name in [*whole, *fns]}
    order = [*whole.items(), *fns.items()]
    for round_ in range(repeats + 1):  # round 0 warms up; odd rounds run in reverse, so order effects cancel
        for name, (fn, setup) in order if round_ % 2 == 0 else order[::-1]:
            elapsed = _timed(fn, setup, trainer)
            if round_:
                samples[name].append(elapsed)
    median = {name: statistics.median(v) for name, v in samples.items()}
    a_parts = sum(median[p] for p in ASSISTANT_PARTS if p in median)
    g_parts = sum(median[p] for p in GENERATOR_PARTS if p in median)
    k = trainer.config.assistant_updates
    iteration_whole, iteration_parts = median["iteration"], k * a_parts + g_parts + median["prompt batch"]
    return {
        "median_s": median,
        "assistant_updates": k,
        "assistant_update": {
            "whole_s": median["assistant update"],
            "parts_s": a_parts,
            "overhead": median["assistant update"] / a_parts,
        },
        "generator_update": {
            "whole_s": median["generator update"],
            "parts_s": g_parts,
            "overhead": median["generator update"] / g_parts,
        },
        "iteration": {
            "whole_s": iteration_whole,
            "parts_s": iteration_parts,
            "overhead": iteration_whole / iteration_parts,
        },
        "passes": passes(trainer),
        "repeats": repeats,
    }


def passes(trainer: Trainer) -> dict[str, dict[str, int]]:
    """Network passes per iteration, in batches of B samples (the reference's CFG pass is one pass on 2B).
    Activation checkpointing adds one forward per backward of a checkpointed UNet (recomputation)."""
    k, ac = trainer.config.assistant_updates, trainer.config.parallel.activation_checkpointing
    vae_ac = trainer.config.parallel.vae_checkpointing
    has_reward = trainer.nets.reward is not None
    return {
        "generator": {"forward": k + 1, "backward": 1, "recompute": int(ac)},
        "assistant": {"forward": k + 1, "backward": k + 1, "recompute": (k + 1) * int(ac)},
        "reference (2B)": {"forward": 1, "backward": 1, "recompute": int(ac)},
        "VAE decoder": {
            "forward": int(has_reward),
            "backward": int(has_reward),
            "recompute": int(has_reward and vae_ac),
        },
        "reward": {"forward": int(has_reward), "backward": int(has_reward), "recompute": 0},
    }


def flops_of_parts(trainer: Trainer) -> dict[str, int]:
    """FLOPs (torch.utils.flop_counter) of each network part of one iteration, run once each; on a "meta" trainer
    this needs no memory. Optimizer parts are element-wise and count zero."""
    from torch.utils.flop_counter import FlopCounterMode

    batches = trainer.method.micro_batches(trainer.samples_seen)
    out = {}
    for name, (fn, _) in parts(trainer, batches).items():
        if name.startswith("optimizer"):
            continue
        with FlopCounterMode(display=False) as counter:
            fn()
        _zero_grads(trainer)
        out[name] = counter.get_total_flops()
    return out


def iteration_flops(trainer: Trainer, per_part: dict[str, int]) -> int:
    k = trainer.config.assistant_updates
    return sum(v * (k if name in ASSISTANT_PARTS else 1) for name, v in per_part.items())
