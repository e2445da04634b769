"""`distar plan`: the per-GPU memory of a training config, before any GPU is asked for.

Static items are exact arithmetic on parameter counts: weights (generator and assistant in fp32, the reference,
VAE and reward in their configured dtypes), gradients (one trainable UNet at a time: the loop frees them after
each update), AdamW's two fp32 states of both UNets, the EMA copy; FSDP divides the three UNets' share by its
degree and adds the unsharded bf16 parameters of the blocks in flight. Activations are measured, not guessed:
the generator update's forward passes (generator, VAE decode, reward, assistant and CFG reference on x_t) run on
the "meta" device, where nothing is allocated, and every tensor saved for the backward pass is counted by
storage. With activation checkpointing a block keeps only its inputs, plus the largest block's activations
while it is recomputed. Under bf16 autocast without FSDP, bf16 copies of the generator's fp32 weights are held
for the update too. The peak is the largest of the loop's phases (see `plan`).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from distar.errors import UserError
from distar.models.architectures import ARCHITECTURES, Architecture, random_networks
from distar.sources import parse_dtype
from distar.train import parallel
from distar.train.config import TrainConfig

GiB = 2**30


def _n(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass
class Activations:
    """Bytes saved for the backward pass of the generator update, per network: as configured (checkpointed
    networks keep their blocks' inputs), and without any checkpointing."""

    without_checkpointing: dict[str, int]
    with_checkpointing: dict[str, int]
    recompute: dict[str, int] = field(default_factory=dict)  # the largest checkpointed block's own activations


class _SavedBytes:
    """Counts the storage bytes saved for backward inside a `with`, attributing them to the innermost marked block;
    parameters are not activations and are left out."""

    def __init__(self, modules: list[nn.Module], blocks: dict[str, list[nn.Module]]):
        self.ignore = {p.untyped_storage()._cdata for m in modules for p in m.parameters()}
        self.seen: set[int] = set()
        self.total = 0
        self.per_block: dict[tuple[str, int], int] = {}
        self.block_inputs: dict[str, int] = {}
        self.inputs_seen: dict[str, set[int]] = {}
        self.alive: list[torch.Tensor] = []
        self.current: list[tuple[str, int]] = []
        self.handles = []
        for group, mods in blocks.items():
            for i, m in enumerate(mods):
                self.handles.append(m.register_forward_pre_hook(self._enter(group, i), with_kwargs=True))
                self.handles.append(m.register_forward_hook(self._leave))

    def _enter(self, group, i):
        def hook(module, args, kwargs):
            self.current.append((group, i))
            inputs = self.inputs_seen.setdefault(group, set())
            for a in [*args, *kwargs.values()]:
                if isinstance(a, torch.Tensor) and a.untyped_storage()._cdata not in inputs:
                    self.alive.append(a)
                    inputs.add(a.untyped_storage()._cdata)
                    self.block_inputs[group] = self.block_inputs.get(group, 0) + a.untyped_storage().nbytes()

        return hook

    def _leave(self, module, args, out):
        self.current.pop()

    def _pack(self, t: torch.Tensor):
        self.alive.append(t)  # a freed storage's address could come back for another tensor
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.ignore and key not in self.seen:
            self.seen.add(key)
            self.total += storage.nbytes()
            if self.current:
                self.per_block[self.current[-1]] = self.per_block.get(self.current[-1], 0) + storage.nbytes()
        return t

    @contextlib.contextmanager
    def counting(self):
        original = torch.nn.functional.scaled_dot_product_attention
        torch.nn.functional.scaled_dot_product_attention = _flash_attention
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                yield
        finally:
            torch.nn.functional.scaled_dot_product_attention = original
            for h in self.handles:
                h.remove()


class _FlashAttentionSaved(torch.autograd.Function):
    """What a fused (flash / memory-efficient) attention kernel keeps for its backward: q, k, v, the output and
    one fp32 log-sum-exp per query. On "meta", SDPA falls back to the math path, whose L×L attention matrices
    no GPU kernel keeps; the plan measures through this stand-in instead (it has no backward: nothing runs one)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out


def _flash_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    return _FlashAttentionSaved.apply(query, key, value)


def _mid_time(family, batch: int, device) -> torch.Tensor:
    """The middle of the family's time range (VP index 500, flow σ = 0.5) for a batch: shapes only."""
    value = family.config_times(500, 500)[0]
    dtype = torch.long if isinstance(value, int) else torch.float32
    return torch.full((batch,), value, dtype=dtype, device=device)


def _meta_networks(config: TrainConfig, arch: Architecture) -> dict:
    return random_networks(arch, next(iter(config.reward.weights), "pickscore"), device="meta")


def measure_activations(config: TrainConfig, arch: Architecture, nets: dict | None = None) -> Activations:
    """Run the generator update's forward passes on "meta" (batch, resolution and dtypes of `config`); `nets` are
    `random_networks` of `arch` on "meta" (made here when not given; their dtypes are changed)."""
    from distar.backbones import Assistant, OneStepGenerator, Reference

    meta = torch.device("meta")
    nets = nets or _meta_networks(config, arch)
    family = arch.family
    # Under bf16 autocast the trainable networks and the VAE compute in bf16 whatever their weights' dtype.
    compute = torch.bfloat16 if config.parallel.mixed_precision == "bf16" else torch.float32
    generator = OneStepGenerator(nets["generator_unet"].to(compute), t_star=config.model.t_star, backbone=family)
    assistant = Assistant(nets["assistant_unet"].to(compute), backbone=family).requires_grad_(False)
    reference_unet = nets["reference_unet"].to(parse_dtype(config.model.reference_dtype))
    reference = Reference(reference_unet, config.loss.guidance_scale(), backbone=family)
    vae = nets["vae"].to(compute).requires_grad_(False)
    reward = nets["reward"]
    if reward is not None:
        reward = reward.to(parse_dtype(config.reward.dtype)).requires_grad_(False)

    vae_blocks = [block for blocks in family.vae_blocks(vae) for block in blocks]
    blocks = {
        "generator": parallel.block_modules(family, generator.unet),
        "assistant": parallel.block_modules(family, assistant.unet),
        "reference": parallel.block_modules(family, reference.unet),
        "vae": vae_blocks,
    }
    modules = [generator, assistant, reference, vae] + ([reward] if reward is not None else [])
    counter = _SavedBytes(modules, blocks)
    b, side = config.data.batch_size, config.data.resolution // arch.vae_factor
    res = config.data.resolution
    cond = family.shape_conditioning(b, res, res, arch.unet, meta)
    z = torch.zeros(b, arch.latent_channels, side, side, device=meta)
    t = _mid_time(family, b, meta)
    parts: dict[str, int] = {}
    with counter.counting():
        before = counter.total
        x0 = generator(z, cond).float()
        parts["generator"] = counter.total - before
        if reward is not None:
            before = counter.total
            images = family.decode(vae, x0).float()
            parts["vae"] = counter.total - before
            before = counter.total
            reward(images, [""] * b)
            parts["reward"] = counter.total - before
        x_t = x0 * 0.5 + torch.zeros_like(x0)
        before = counter.total
        assistant(x_t, t, cond)
        parts["assistant"] = counter.total - before
        before = counter.total
        reference(x_t, t, cond)
        parts["reference"] = counter.total - before
    with_ckpt = dict(parts)
    recompute = {}
    for group in blocks:
        if group not in parts:
            continue
        inside = {i: v for (g, i), v in counter.per_block.items() if g == group}
        checkpointed = config.parallel.vae_checkpointing if group == "vae" else config.parallel.activation_checkpointing
        if checkpointed and inside:
            with_ckpt[group] = parts[group] - sum(inside.values()) + counter.block_inputs.get(group, 0)
            recompute[group] = max(inside.values())
    return Activations(parts, with_ckpt, recompute)


def plan(config: TrainConfig, world_size: int, arch: Architecture | str = "sdxl", text_encoders: bool = False) -> dict:
    """Per-GPU bytes of each item and the predicted peak for `config` on `world_size` GPUs."""
    if world_size < 1:
        raise UserError(f"--gpus must be at least 1, got {world_size}")
    arch = ARCHITECTURES[arch]() if isinstance(arch, str) else arch
    nets = _meta_networks(config, arch)
    p_unet, p_vae = _n(nets["reference_unet"]), _n(nets["vae"])
    p_reward = _n(nets["reward"]) if nets["reward"] is not None and config.reward.weights else 0
    p_block = max(_n(block) for block in parallel.block_modules(arch.family, nets["reference_unet"]))
    strategy = config.parallel.strategy
    shard = world_size if strategy == "fsdp" else 1
    if strategy == "none" and world_size > 1:
        raise UserError("parallel.strategy='none' runs one process; plan it with --gpus 1, or choose ddp or fsdp")
    ref_b, vae_b, rew_b = (
        parse_dtype(d).itemsize for d in (config.model.reference_dtype, config.model.vae_dtype, config.reward.dtype)
    )
    bf16 = config.parallel.mixed_precision == "bf16"
    lora = config.model.assistant == "lora"
    targets = arch.family.lora_targets
    online = text_encoders or not arch.family.embedding_columns
    encoder_bytes = parse_dtype(config.model.text_encoder_dtype).itemsize * arch.family.text_encoder_parameters
    encoder_bytes = encoder_bytes if online else 0
    p_assistant = lora_parameters(nets["reference_unet"], config.model.assistant_lora_rank, targets) if lora else p_unet
    lora_g = config.model.generator == "lora"
    p_generator = (
        lora_parameters(nets["reference_unet"], config.model.generator_lora_rank, targets) if lora_g else p_unet
    )
    trained = (
        f"{'generator LoRA adapters' if lora_g else 'generator'} + {'assistant LoRA adapters' if lora else 'assistant'}"
    )
    adamw = 2 * 4 * (p_generator + p_assistant) / shard
    items = {
        f"weights: {trained} (fp32)": 4 * (p_generator + p_assistant) / shard,
        "weights: generator's frozen base": ref_b * p_unet / shard if lora_g else 0,
        "weights: reference" + (" (also the assistant's base)" if lora else ""): ref_b * p_unet / shard,
        "weights: VAE": vae_b * p_vae,
        "weights: reward": rew_b * p_reward,
        f"optimizer: AdamW states, {trained if lora or lora_g else 'both UNets'} (fp32)": adamw,
        "EMA of the generator (fp32)": 4 * p_generator / shard if config.ema_decay > 0 else 0,
        # online encoding where the family has no precomputed embeddings (the flow families: T5-XXL's 4.76 B);
        # offloaded, they are on the GPU only in the encoding phase below
        "text encoders": encoder_bytes if not config.model.text_encoder_offload else 0,
    }
    grads = 4 * max(p_generator, p_assistant) / shard  # and multi-tensor AdamW's temporaries of the same size
    in_flight = 0.0
    if strategy == "fsdp":  # the current and the prefetched block unsharded in the compute dtype, one block's grads
        in_flight = 2 * (2 if bf16 else 4) * p_block + 4 * p_block
    autocast_copies = 2 * p_generator if bf16 and strategy != "fsdp" else 0
    # parallel.bf16_weight_copies: the generator's bf16 copy while the assistant updates run, the frozen
    # assistant's while the generator update runs (a LoRA assistant's copy is its adapters')
    copies_g = 2 * p_generator if config.parallel.bf16_weight_copies else 0
    copies_a = 2 * p_assistant if config.parallel.bf16_weight_copies else 0
    acts = measure_activations(config, arch, nets)
    used, recompute = acts.with_checkpointing, acts.recompute
    frozen_recompute = max((v for k, v in recompute.items() if k != "generator"), default=0)
    static = sum(items.values())
    # The backward runs from the loss through the frozen networks (each releases its activations as it goes) and
    # ends in the generator; its gradients exist only from then on. Multi-tensor AdamW then makes full-size
    # temporaries (√v, the update) of one network's parameters.
    phases = {
        "generator update: backward through the frozen networks": sum(used.values())
        + frozen_recompute
        + autocast_copies
        + copies_a
        + in_flight,
        "generator update: generator backward": used["generator"]
        + recompute.get("generator", 0)
        + grads
        + autocast_copies
        + copies_a
        + in_flight,
        "assistant update": 4 * p_assistant / shard
        + used["assistant"]
        + recompute.get("assistant", 0)
        + autocast_copies
        + copies_g
        + in_flight,
        "optimizer step": grads + (0 if _fused(config) else grads),
    }
    if config.model.text_encoder_offload and encoder_bytes:
        # their GPU copy while one batch is encoded (the encoders' activations are small beside their weights)
        phases["text encoding (encoders offloaded between steps)"] = encoder_bytes
    peak_phase = max(phases, key=phases.get)
    return {
        "world_size": world_size,
        "strategy": strategy,
        "fsdp_degree": shard,
        "arch": arch.name,
        "batch_per_gpu": config.data.batch_size,
        "resolution": config.data.resolution,
        "activation_checkpointing": config.parallel.activation_checkpointing,
        "vae_checkpointing": config.parallel.vae_checkpointing,
        "mixed_precision": config.parallel.mixed_precision,
        "assistant": config.model.assistant,
        "generator": config.model.generator,
        "parameters": {
            "unet": p_unet,
            "generator": p_generator,
            "assistant": p_assistant,
            "vae": p_vae,
            "reward": p_reward,
            "largest_unet_block": p_block,
        },
        "static": items,
        "gradients (one UNet)": grads,
        "fsdp blocks in flight": in_flight,
        "autocast bf16 weight copies": autocast_copies,
        "bf16 weight copies made once": {"generator": copies_g, "assistant": copies_a},
        "activations": {"used": used, "without_checkpointing": acts.without_checkpointing, "recompute": recompute},
        "phases": phases,
        "peak_phase": peak_phase,
        "peak_bytes": static + phases[peak_phase],
    }


def lora_parameters(net: nn.Module, rank: int, targets: tuple[str, ...]) -> int:
    """Parameters of rank-`rank` LoRA adapters on `net`'s `targets` (the backbone's `lora_targets`):
    r · (in + out) per adapted linear layer."""
    return sum(
        rank * (m.in_features + m.out_features)
        for name, m in net.named_modules()
        if isinstance(m, nn.Linear) and any(name.endswith(f".{t}") for t in targets)
    )


def _fused(config: TrainConfig) -> bool:
    return config.generator_optim.implementation == "fused" and config.assistant_optim.implementation == "fused"


def format_plan(result: dict, gpu_gib: float | None = None) -> str:
    g = lambda b: f"{b / GiB:8.2f} GiB"  # noqa: E731
    lines = [
        f"distar plan: {result['arch']} on {result['world_size']} GPU(s), {result['strategy']} "
        f"(shard degree {result['fsdp_degree']}), {result['batch_per_gpu']} image(s)/GPU at "
        f"{result['resolution']}², {result['mixed_precision']}, activation checkpointing "
        f"{'on' if result['activation_checkpointing'] else 'off'}, VAE checkpointing "
        f"{'on' if result['vae_checkpointing'] else 'off'}, generator {result.get('generator', 'full')}, "
        f"assistant {result['assistant']}",
    ]
    lines += [f"  {g(v)}  {k}" for k, v in result["static"].items() if v]
    lines.append(f"  {g(result['gradients (one UNet)'])}  gradients (one UNet at a time, fp32)")
    if result["fsdp blocks in flight"]:
        lines.append(f"  {g(result['fsdp blocks in flight'])}  FSDP: unsharded blocks in flight")
    if result["autocast bf16 weight copies"]:
        lines.append(f"  {g(result['autocast bf16 weight copies'])}  autocast: bf16 copies of the generator's weights")
    made_once = result["bf16 weight copies made once"]
    if made_once["generator"]:
        lines.append(
            f"  {g(made_once['generator'])}  bf16 copies made once: the generator's during the assistant updates "
            f"(the assistant's during the generator update: {made_once['assistant'] / GiB:.2f} GiB)"
        )
    a = result["activations"]
    lines.append(
        f"  {g(sum(a['used'].values()))}  activations kept for the generator update's backward "
        f"(without checkpointing: {sum(a['without_checkpointing'].values()) / GiB:.2f} GiB)"
    )
    lines.append(f"  {g(max(a['recompute'].values(), default=0))}  the largest checkpointed block, recomputed")
    lines.append(f"  {g(result['peak_bytes'])}  predicted peak per GPU ({result['peak_phase']})")
    if gpu_gib:
        fits = result["peak_bytes"] / GiB <= gpu_gib
        lines.append(f"  {'fits' if fits else 'does NOT fit'} in {gpu_gib:g} GiB")
    return "\n".join(lines)


# -- time and cost ------------------------------------------------------------------------------------------

# Datasheet figures per GPU: dense bf16 peak FLOP/s and NVLink bandwidth per direction (bytes/s); InfiniBand per GPU
# is an input (NDR 400 Gb/s = 50 GB/s by default). Every one of them can be given instead on the command line.
GPUS = {
    "a100": {"bf16_flops": 312e12, "nvlink_bytes_s": 300e9},
    "h100": {"bf16_flops": 989e12, "nvlink_bytes_s": 450e9},
    "h200": {"bf16_flops": 989e12, "nvlink_bytes_s": 450e9},
    "b200": {"bf16_flops": 2250e12, "nvlink_bytes_s": 900e9},
}
INFINIBAND_BYTES_S = 50e9

# The newest GPU measurement of a DI* iteration on SDXL (benchmarks/gpu_sdxl_step.py, docs/PERFORMANCE.md): one
# GPU, the config's FLOPs with recomputation as this module counts them, and the fastest variant's iteration. Its
# FLOP rate, not the datasheet's, turns FLOPs into time when no benchmark or rate is given (the datasheet rate
# predicted 1/7 of the measured time: the iteration is bound by the host, not by matrix products).
RECORDED = {
    "device": "NVIDIA H200",
    "gpu": "h200",
    "date": "2026-11-26",
    "torch": "2.11.0+cu130",
    "file": "docs/gpu/h200_2026-11-26.json",
    "batch": 2,
    "resolution": 1024,
    "flops_with_recompute": 578173491937280.0,
    "iteration_s": 5.358911030999991,
}


def recorded_rate(gpu: str) -> tuple[float, str]:
    """(FLOP/s, where it comes from) for `gpu` without a benchmark of its own: the recorded measurement's rate,
    scaled by the ratio of the datasheets' bf16 rates for another card."""
    if gpu not in GPUS:
        raise UserError(f"--gpu-type {gpu!r}: choose one of {', '.join(GPUS)} (or give --flops-per-gpu)")
    measured = RECORDED["flops_with_recompute"] / RECORDED["iteration_s"]
    scale = GPUS[gpu]["bf16_flops"] / GPUS[RECORDED["gpu"]]["bf16_flops"]
    where = (
        f"the FLOP rate measured on an {RECORDED['device']} on {RECORDED['date']} (batch {RECORDED['batch']} at "
        f"{RECORDED['resolution']}², {RECORDED['file']})"
    )
    if scale != 1:
        where += f" × {scale:.2f}, {gpu}'s datasheet rate over the {RECORDED['gpu']}'s"
    where += "; measure your own with benchmarks/gpu_sdxl_step.py and pass --benchmark"
    return measured * scale, where


def _checkpointed(family) -> re.Pattern:
    """The modules activation checkpointing wraps (the backbone's `blocks` and `vae_blocks`), by their names in
    torch's FLOP counter: only their forwards run again in the backward pass."""
    return re.compile(rf"^[^.]+(?:\.unet)?\.{family.block_pattern}$|^[^.]+\.{family.vae_block_pattern}$")


def forward_flops(
    config: TrainConfig, arch: Architecture, nets: dict | None = None
) -> tuple[dict[str, int], dict[str, int]]:
    """FLOPs of one forward of each network at the config's per-GPU batch (torch.utils.flop_counter on "meta"),
    and of the part of it inside the modules activation checkpointing wraps."""
    from torch.utils.flop_counter import FlopCounterMode

    from distar.backbones import Assistant, OneStepGenerator, Reference

    meta = torch.device("meta")
    nets = nets or _meta_networks(config, arch)
    family = arch.family
    b, side, res = config.data.batch_size, config.data.resolution // arch.vae_factor, config.data.resolution
    cond = family.shape_conditioning(b, res, res, arch.unet, meta)
    z = torch.zeros(b, arch.latent_channels, side, side, device=meta)
    t = _mid_time(family, b, meta)
    generator = OneStepGenerator(nets["generator_unet"], t_star=config.model.t_star, backbone=family)
    assistant = Assistant(nets["assistant_unet"], backbone=family).requires_grad_(False)
    reference = Reference(nets["reference_unet"], config.loss.guidance_scale(), backbone=family)
    calls = {
        "generator": lambda: generator(z, cond),
        "assistant": lambda: assistant(z, t, cond),
        "reference (CFG, 2B)": lambda: reference(z, t, cond),
    }
    if nets["reward"] is not None and config.reward.weights:
        images = torch.zeros(b, 3, res, res, device=meta)
        calls["VAE decode"] = lambda: family.decode(nets["vae"].requires_grad_(False), z)
        calls["reward"] = lambda: nets["reward"].requires_grad_(False)(images, [""] * b)
    out, inside = {}, {}
    checkpointed = _checkpointed(family)
    for name, call in calls.items():
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            call()
        out[name] = counter.get_total_flops()
        counts = counter.get_flop_counts()
        inside[name] = sum(sum(counts[key].values()) for key in counts if checkpointed.match(key))
    return out, inside


def iteration_flops(
    config: TrainConfig, forward: dict[str, int], checkpointed: dict[str, int] | None = None
) -> dict[str, float]:
    """Model FLOPs of one iteration per GPU from the forward FLOPs F: a backward costs 2F where weights get
    gradients and F where only the input does (the frozen networks on the generator's path).
      generator update:      3 F_gen + 2 (F_vae + F_reward + F_assistant + F_reference)
      each assistant update: F_gen (samples, no grad) + 3 F_assistant
    With activation checkpointing the checkpointed blocks' forwards (`checkpointed`; default: whole forwards) run
    once more in their backward."""
    k = config.assistant_updates
    frozen_path = sum(forward.get(n, 0) for n in ("VAE decode", "reward", "assistant", "reference (CFG, 2B)"))
    model = 3 * forward["generator"] + 2 * frozen_path + k * (forward["generator"] + 3 * forward["assistant"])
    again = checkpointed if checkpointed is not None else forward
    recompute = 0.0
    if config.parallel.activation_checkpointing:
        unets = again["generator"] + again["assistant"] + again["reference (CFG, 2B)"]
        recompute += unets + k * again["assistant"]
    if config.parallel.vae_checkpointing:
        recompute += again.get("VAE decode", 0)
    return {"model": float(model), "with_recompute": float(model + recompute)}


def communication_bytes(
    config: TrainConfig, p_unet: int, p_assistant: int, world_size: int, p_generator: int | None = None
) -> dict[str, float]:
    """Bytes each GPU receives per iteration. FSDP2 (ring collectives, (N−1)/N of the full size): every forward
    all-gathers a UNet's bf16 parameters and its backward gathers them again (reshard after forward); what trains
    (a UNet, or LoRA adapters) has its gradients reduce-scattered in fp32. DDP all-reduces fp32 gradients
    (2 (N−1)/N of their size)."""
    n, k = world_size, config.assistant_updates
    if n == 1 or config.parallel.strategy == "none":
        return {"generator update": 0.0, "assistant updates": 0.0, "total": 0.0}
    ring = (n - 1) / n
    if config.parallel.strategy == "fsdp":
        # a LoRA network gathers its bf16 base (its adapters are a rounding error) but scatters the adapters' grads
        gather = 2 * p_unet * ring
        scatter_g = 4 * (p_generator if p_generator is not None else p_unet) * ring
        scatter_a = 4 * p_assistant * ring
        # generator: forward + backward gathers and its gradients; assistant and reference: gathered twice each
        generator_update = 2 * gather + scatter_g + 2 * gather + 2 * gather
        # per assistant update: the generator's sample forward, the assistant's two gathers and its gradients
        assistant_updates = k * (gather + 2 * gather + scatter_a)
    else:  # what trains: a UNet, or LoRA adapters
        generator_update = 2 * ring * 4 * (p_generator if p_generator is not None else p_unet)
        assistant_updates = k * 2 * ring * 4 * p_assistant
    return {
        "generator update": generator_update,
        "assistant updates": assistant_updates,
        "total": generator_update + assistant_updates,
    }


def estimate_time(
    config: TrainConfig,
    result: dict,
    flops: dict[str, float],
    gpu: str,
    achievable_flops: float | None = None,
    nodes: int = 1,
    nvlink_bytes_s: float | None = None,
    infiniband_bytes_s: float = INFINIBAND_BYTES_S,
    measured_iteration_s: float | None = None,
    source: str = "the datasheet's bf16 rate",
) -> dict:
    """Iteration time, wall time and GPU-hours for `config.steps` steps.
      compute    = FLOPs with recompute / achievable FLOP/s (a matrix-product rate: a lower bound on time)
      transfer   = communication bytes / link bandwidth (NVLink within a node; InfiniBand once there are nodes)
      iteration  = compute + transfer (no overlap; with full overlap, the larger of the two)
      wall       = iteration × steps;  GPU-hours = wall × GPUs / 3600
    A measured single-GPU iteration (benchmarks/gpu_sdxl_step.py) replaces `compute` when given. `source` says where
    the rate or the iteration comes from, for the reader."""
    if gpu not in GPUS:
        raise UserError(f"--gpu-type {gpu!r}: choose one of {', '.join(GPUS)} (or give --flops-per-gpu)")
    spec = GPUS[gpu]
    rate = achievable_flops or spec["bf16_flops"]
    link = infiniband_bytes_s if nodes > 1 else (nvlink_bytes_s or spec["nvlink_bytes_s"])
    p = result["parameters"]
    comm = communication_bytes(config, p["unet"], p["assistant"], result["world_size"], p.get("generator"))
    compute_s = flops["with_recompute"] / rate
    transfer_s = comm["total"] / link
    base_s = measured_iteration_s if measured_iteration_s is not None else compute_s
    iteration_s = base_s + transfer_s
    wall_s = iteration_s * config.steps
    return {
        "gpu": gpu,
        "source": source,
        "flop_rate": rate,
        "link_bytes_s": link,
        "nodes": nodes,
        "flops_per_iteration": flops,
        "communication_bytes": comm,
        "compute_s": compute_s,
        "transfer_s": transfer_s,
        "measured_iteration_s": measured_iteration_s,
        "iteration_s": iteration_s,
        "iteration_s_overlapped": max(base_s, transfer_s),
        "images_per_s": config.data.batch_size * config.data.grad_accum * result["world_size"] / iteration_s,
        "steps": config.steps,
        "wall_hours": wall_s / 3600,
        "gpu_hours": wall_s * result["world_size"] / 3600,
    }


def largest_batch(config: TrainConfig, world_size: int, arch, gpu_gib: float, limit: int = 64) -> tuple[int, dict]:
    """The largest per-GPU batch whose predicted peak fits in `gpu_gib`: activations grow linearly with the batch,
    so two plans (batch 1 and 2) give the line, and a third checks its answer (and one below, if needed)."""
    import dataclasses

    def at(batch: int) -> dict:
        c = dataclasses.replace(config, data=dataclasses.replace(config.data, batch_size=batch))
        return plan(c, world_size, arch)

    one, two = at(1), at(2)
    slope = two["peak_bytes"] - one["peak_bytes"]
    budget = gpu_gib * GiB
    if one["peak_bytes"] > budget:
        return 0, one
    guess = limit if slope <= 0 else int(min(limit, 1 + (budget - one["peak_bytes"]) // slope))
    checked = at(guess) if guess > 2 else (two if guess == 2 else one)
    if checked["peak_bytes"] <= budget:
        return guess, checked
    # the line overestimated what fits (a block's recompute or an attention buffer grows faster than linearly):
    # bisect between the largest batch known to fit and the guess, a plan per halving instead of one per batch
    fits, fits_plan = (2, two) if two["peak_bytes"] <= budget else (1, one)
    too_big = guess
    while too_big - fits > 1:
        middle = (fits + too_big) // 2
        candidate = at(middle)
        if candidate["peak_bytes"] <= budget:
            fits, fits_plan = middle, candidate
        else:
            too_big = middle
    return fits, fits_plan


def format_time(t: dict) -> str:
    f = t["flops_per_iteration"]
    c = t["communication_bytes"]
    lines = [
        f"time on {t['gpu']} ({t['flop_rate'] / 1e12:.0f} TFLOP/s, link {t['link_bytes_s'] / 1e9:.0f} GB/s, "
        f"{t['nodes']} node(s)):",
        f"  {f['model'] / 1e12:9.1f} TFLOP  model FLOPs per GPU per iteration ({f['with_recompute'] / 1e12:.1f} with "
        f"the recomputation)",
        f"  {c['total'] / 1e9:9.1f} GB     received per GPU per iteration ({c['generator update'] / 1e9:.1f} "
        f"generator update, {c['assistant updates'] / 1e9:.1f} assistant updates)",
        f"  {t['compute_s']:9.2f} s      compute at that rate",
        f"  {t['transfer_s']:9.2f} s      communication",
    ]
    if t["measured_iteration_s"] is not None:
        lines.append(
            f"  {t['measured_iteration_s']:9.2f} s      measured single-GPU iteration (its compute: "
            f"{t['measured_iteration_s'] / max(t['compute_s'], 1e-12):.1f}× the FLOP-rate estimate)"
        )
    lines += [
        f"  {t['iteration_s']:9.2f} s      per iteration ({t['iteration_s_overlapped']:.2f} s if communication "
        f"overlaps compute); {t['images_per_s']:.2f} images/s",
        f"  {t['wall_hours']:9.1f} h      wall time for {t['steps']} steps; {t['gpu_hours']:.0f} GPU-hours",
        f"  time from: {t['source']}",
    ]
    return "\n".join(lines)


def read_benchmark(path: str, config: TrainConfig) -> tuple[float, float | None]:
    """(the fastest measured iteration in seconds, the measured bf16 matmul FLOP/s) of a gpu_sdxl_step.py JSON;
    refused when it measured another batch or resolution than `config`'s."""
    import json
    from pathlib import Path

    try:
        run = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"--benchmark {path!r}: not a readable JSON file ({err})") from err
    batch = run.get("batch") or _override(run.get("overrides", []), "data.batch_size")
    resolution = run.get("resolution") or _override(run.get("overrides", []), "data.resolution")
    if (batch, resolution) != (config.data.batch_size, config.data.resolution):
        raise UserError(
            f"--benchmark {path!r} measured batch {batch} at {resolution}²; the config trains batch "
            f"{config.data.batch_size} at {config.data.resolution}²: measure that, or plan with the benchmark's"
        )
    times = [run[v]["iteration_s"] for v in run.get("variants", {}) if "iteration_s" in run.get(v, {})]
    if "iteration_s" in run:
        times.append(run["iteration_s"])
    if not times:
        raise UserError(f"--benchmark {path!r} holds no iteration_s")
    return min(times), run.get("matmul_bf16_flops")


def _override(overrides: list[str], key: str):
    for item in overrides:
        k, _, v = item.partition("=")
        if k == key:
            return int(v)
    return None
