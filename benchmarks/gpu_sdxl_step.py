"""The DI* iteration at SDXL scale on one GPU: real SDXL-architecture networks (random weights, the published
configs), 1024×1024, bf16 autocast over fp32 master weights, activation checkpointing (UNets and VAE decoder).

Measures, in one run: the bf16 matrix-product ceiling of the card; the iteration time (K_TA = 5 assistant
updates and one generator update, the sdxl preset) and its anatomy; peak memory; the FLOPs of one iteration
counted on the device with torch.utils.flop_counter (hardware FLOPs, recomputation included) and the model
FLOPs counted on "meta" without checkpointing; MFU against the datasheet's dense bf16 peak and against the
measured ceiling; one-step generation against the reference's 50-step CFG sampling at 1024×1024.

    python benchmarks/gpu_sdxl_step.py --out results.json          (a CUDA GPU with ≥ 100 GB: unsharded, one GPU)
    python benchmarks/gpu_sdxl_step.py --arch medium --device cpu  (the same script on a CPU-sized model)
Each stage's results are written to --out as soon as they exist.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import anatomy  # noqa: E402

from distar.models.architectures import ARCHITECTURES  # noqa: E402
from distar.train.distributed import World  # noqa: E402
from distar.train.trainer import host_values  # noqa: E402

COPIES = ["parallel.mixed_precision=bf16", "parallel.bf16_weight_copies=true"]
FUSED_NO_SHARDING = [
    "parallel.strategy=none",
    "generator_optim.implementation=fused",
    "assistant_optim.implementation=fused",
]

# Dense bf16 tensor-core peak by datasheet (no sparsity), by the name torch reports.
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "B200": 2250e12}


def datasheet_peak(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def _median_time(fn, device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        anatomy.synchronize(device)
        start = time.perf_counter()
        fn()
        anatomy.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_ceiling(device: torch.device, n: int = 8192) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    seconds = _median_time(lambda: [a @ b for _ in range(10)], device, repeats=3)
    return 10 * 2 * n**3 / seconds


def memory_gb(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    return {
        "allocated_gb": torch.cuda.memory_allocated(device) / 2**30,
        "peak_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30,
        "reserved_gb": torch.cuda.memory_reserved(device) / 2**30,
    }


def sampling(trainer, device: torch.device, steps: int = 50, repeats: int = 3) -> dict:
    """One generator pass against `steps` Euler steps of the CFG reference (2B per step), same bf16 UNet, B = 1."""
    from diffusers import EulerDiscreteScheduler

    from distar.backbones import OneStepGenerator

    unet, reference = trainer.nets.reference.unet, trainer.nets.reference
    one_step = OneStepGenerator(unet, t_star=trainer.config.model.t_star)
    batch = trainer.data.batch(0, 0, 1, 1, 0, shuffle=False)
    cond = trainer.method.conditioning(batch)
    z = torch.randn((1, *trainer.latent_shape), device=device)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        timestep_spacing="leading",
        steps_offset=1,
    )

    @torch.no_grad()
    def generate_one():
        one_step(z, cond)

    @torch.no_grad()
    def generate_many():
        scheduler.set_timesteps(steps, device=device)
        x = z * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            eps = reference(scheduler.scale_model_input(x, t), t.long().reshape(1), cond)
            x = scheduler.step(eps, t, x).prev_sample

    t1 = _median_time(generate_one, device, repeats)
    t50 = _median_time(generate_many, device, repeats)
    return {"one_step_s": t1, "many_step_cfg_s": t50, "steps": steps, "ratio": t1 / t50, "batch": 1}


def attention_kernels(trainer, device: torch.device) -> dict[str, int]:
    """The GPU kernels one reference pass (CFG, 2B) runs whose names say attention: which SDPA backend (flash,
    memory-efficient, cuDNN, or the unfused math path) the UNet's attention reached."""
    from torch.profiler import ProfilerActivity, profile

    batch = trainer.data.batch(0, 0, 1, trainer.config.data.batch_size, 0, shuffle=False)
    cond = trainer.method.conditioning(batch)
    x = torch.randn((len(batch.prompts), *trainer.latent_shape), device=device)
    t = torch.full((x.shape[0],), 500, device=device, dtype=torch.long)
    with torch.no_grad(), trainer.autocast, profile(activities=[ProfilerActivity.CUDA]) as prof:
        trainer.nets.reference(x, t, cond)
        anatomy.synchronize(device)
    words = ("flash", "fmha", "attention", "attn", "softmax")
    return {
        e.key: e.count
        for e in prof.key_averages()
        if e.device_type.name == "CUDA" and any(w in e.key.lower() for w in words)
    }


def model_flops(arch_name: str, preset: str, overrides: list[str], workdir: Path) -> dict:
    """FLOPs of each part counted on "meta" (shapes only), with and without activation checkpointing."""
    out = {}
    for ac in (False, True):
        world = World(0, 0, 1, torch.device("meta"))
        trainer = anatomy.build_trainer(
            ARCHITECTURES[arch_name](),
            preset,
            [
                *overrides,
                "parallel.mixed_precision=fp32",
                f"parallel.activation_checkpointing={str(ac).lower()}",
                f"parallel.vae_checkpointing={str(ac).lower()}",
            ],
            workdir / f"meta-{ac}",
            world=world,
        )
        per_part = anatomy.flops_of_parts(trainer)
        out["with_checkpointing" if ac else "model"] = {
            "per_part": per_part,
            "iteration": anatomy.iteration_flops(trainer, per_part),
        }
    return out


def iterations(args, name: str, overrides: list[str], workdir: Path, world: World):
    """Build a trainer, one warm-up iteration, then `args.iterations` timed ones; memory at each point."""
    device = world.device
    started = time.perf_counter()
    trainer = anatomy.build_trainer(ARCHITECTURES[args.arch](), "sdxl", overrides, workdir, world=world)
    out = {
        "build_s": time.perf_counter() - started,
        "memory_after_build": memory_gb(device),
        "batch": trainer.config.data.batch_size,
    }
    trainer.train_step()  # warm-up: optimizer states, kernels, allocator
    out["memory_after_first_iteration"] = memory_gb(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, values = [], {}
    for _ in range(args.iterations):
        anatomy.synchronize(device)
        start = time.perf_counter()
        values = trainer.train_step()
        anatomy.synchronize(device)
        times.append(time.perf_counter() - start)
    out.update(
        {
            "iteration_s": statistics.median(times),
            "iteration_samples_s": times,
            "images_per_s": trainer.config.data.batch_size / statistics.median(times),
            "memory_iterations": memory_gb(device),
            "last_values": host_values({k: v for k, v in values.items() if not k.startswith("ok/")}),
            "skipped": trainer.skipped(),
        }
    )
    return trainer, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sdxl", choices=sorted(ARCHITECTURES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=2, help="images per GPU")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the anatomy")
    parser.add_argument("--out", default="gpu_sdxl_step.json")
    parser.add_argument("--sampling-steps", type=int, default=50, help="steps of the CFG reference sampler")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override for all")
    parser.add_argument("--profile", action="store_true", help="write a torch.profiler table of one iteration")
    parser.add_argument(
        "--skip-model-flops",
        action="store_true",
        help="leave out the shape-only FLOP count (minutes of one CPU core; `make bench` makes it too)",
    )
    parser.add_argument("--skip-variant", action="append", default=[], help="leave out a variant (repeatable)")
    parser.add_argument(
        "--only-variant", action="append", default=[], help="run only these variants (repeatable; fsdp+fused always)"
    )
    parser.add_argument(
        "--largest-batch",
        metavar="VARIANT",
        help="also run VARIANT at the largest batch per GPU that `distar plan` fits in the card's memory",
    )
    args = parser.parse_args(argv)

    from distar.train import distributed

    world = distributed.init(args.device)
    device = world.device
    preset = "sdxl"
    base = [f"data.batch_size={args.batch}", f"data.resolution={args.resolution}", *args.set]
    # The sdxl preset's path on one GPU (FSDP2 over a mesh of one: bf16 compute copies made once per block, fused
    # AdamW) against plain autocast over fp32 weights with multi-tensor AdamW, side by side.
    variants = {
        "autocast+foreach": [
            *base,
            "parallel.strategy=none",
            "generator_optim.implementation=foreach",
            "assistant_optim.implementation=foreach",
        ],
        "fsdp+fused": [
            *base,
            "parallel.strategy=fsdp",
            "generator_optim.implementation=fused",
            "assistant_optim.implementation=fused",
        ],
        # regional compilation (each UNet block and the VAE decoder), the compile excluded by the warm-up iteration
        "autocast+fused+compile": [
            *base,
            "parallel.strategy=none",
            "parallel.compile=true",
            "generator_optim.implementation=fused",
            "assistant_optim.implementation=fused",
        ],
        # the sdxl-1gpu preset's assistant: LoRA adapters on the reference's UNet (one UNet fewer in memory)
        "lora-assistant+fused": [
            *base,
            "parallel.strategy=none",
            "model.assistant=lora",
            "generator_optim.implementation=fused",
            "assistant_optim.implementation=fused",
        ],
        # bf16 weights of the frozen passes made once per update (no per-call casts), the skip decided on the
        # device (fused AdamW: no host sync between log steps)
        "autocast+fused+copies": [*base, *FUSED_NO_SHARDING, *COPIES],
        # ... and channels_last convolutions, the VAE decoder in bf16 with fp32 GroupNorm
        "autocast+fused+copies+nhwc+vae-bf16": [
            *base,
            *FUSED_NO_SHARDING,
            *COPIES,
            "parallel.channels_last=true",
            "model.vae_dtype=bf16",
        ],
        # the smallest memory: generator and assistant both LoRA (frozen bf16 bases), with the copies
        "lora-both+fused+copies": [
            *base,
            *FUSED_NO_SHARDING,
            *COPIES,
            "model.assistant=lora",
            "model.generator=lora",
        ],
        # all of it compiled per region
        "autocast+fused+copies+nhwc+vae-bf16+compile": [
            *base,
            *FUSED_NO_SHARDING,
            *COPIES,
            "parallel.channels_last=true",
            "model.vae_dtype=bf16",
            "parallel.compile=true",
        ],
    }
    for name in args.skip_variant:
        variants.pop(name, None)
    if args.only_variant:
        variants = {k: v for k, v in variants.items() if k in args.only_variant or k == "fsdp+fused"}
    if args.largest_batch and args.largest_batch not in variants:
        parser.error(f"--largest-batch {args.largest_batch!r} is not a variant: {', '.join(variants)}")
    if args.largest_batch and device.type == "cuda":
        from distar.plan import largest_batch
        from distar.train.config import load_config

        chosen = [o for o in variants[args.largest_batch] if not o.startswith("data.batch_size=")]
        gib = torch.cuda.get_device_properties(device).total_memory / 2**30 * 0.97
        n, _ = largest_batch(load_config(preset, ["data.prompts=unused", *chosen]), 1, args.arch, gib)
        variants[f"{args.largest_batch}@batch{n}"] = [*chosen, f"data.batch_size={n}"]
    result: dict = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "arch": args.arch,
        "preset": preset,
        "variants": variants,
        "torch": torch.__version__,
        "batch": args.batch,
        "resolution": args.resolution,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)",
    }

    def save(stage: str):
        Path(args.out).write_text(json.dumps(result, indent=2, default=float))
        print(f"[{time.strftime('%H:%M:%S')}] {stage}: done", flush=True)

    if device.type == "cuda":
        result["matmul_bf16_flops"] = matmul_ceiling(device)
        save("matmul ceiling")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        trainer = None
        for name, overrides in variants.items():
            trainer = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            try:
                trainer, result[name] = iterations(args, name, overrides, workdir / name, world)
            except Exception as err:  # one failing variant must not lose the others' numbers
                result[name] = {"error": f"{type(err).__name__}: {err}"}
            save(name)
        main_variant = result["fsdp+fused"]
        if trainer is None or "error" in main_variant:
            return 1
        result["iteration_s"] = main_variant["iteration_s"]
        result["assistant_updates"] = trainer.config.assistant_updates

        result["anatomy"] = anatomy.anatomy(trainer, repeats=args.repeats)
        save("anatomy")

        result["sampling"] = sampling(trainer, device, steps=args.sampling_steps)
        save("sampling")
        if device.type == "cuda":
            result["attention_kernels"] = attention_kernels(trainer, device)
            save("attention kernels")

        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=activities) as prof:
                trainer.train_step()
                anatomy.synchronize(device)
            sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
            table = prof.key_averages().table(sort_by=sort, row_limit=60)
            Path(args.out).with_suffix(".profile.txt").write_text(table)
            save("profile")

        # Per part (their sum is the iteration's count, optimizer aside): the optimizer under a dispatch mode
        # would hold the whole iteration's temporaries at once.
        per_part = anatomy.flops_of_parts(trainer)
        result["hardware_flops_per_part"] = per_part
        result["hardware_flops_counted"] = anatomy.iteration_flops(trainer, per_part)
        save("flop count")
        del trainer
        if device.type == "cuda":
            torch.cuda.empty_cache()

        if args.skip_model_flops:
            print(json.dumps(result, indent=2, default=float))
            return 0
        result["flops_meta"] = model_flops(args.arch, preset, [*base, "parallel.strategy=none"], workdir)
        model = result["flops_meta"]["model"]["iteration"]
        result["model_flops_per_iteration"] = model
        result["achieved_model_flops"] = model / result["iteration_s"]
        result["achieved_hardware_flops"] = result["hardware_flops_counted"] / result["iteration_s"]
        peak = datasheet_peak(result["device"])
        if peak:
            result["datasheet_peak_bf16"] = peak
            result["mfu"] = result["achieved_model_flops"] / peak
            result["hfu"] = result["achieved_hardware_flops"] / peak
        if "matmul_bf16_flops" in result:
            result["mfu_of_measured_ceiling"] = result["achieved_model_flops"] / result["matmul_bf16_flops"]
        # Every variant's MFU: model FLOPs grow linearly with the batch (every network works per image)
        for name in variants:
            v = result.get(name, {})
            if "iteration_s" in v:
                v["model_flops_per_iteration"] = model * v["batch"] / args.batch
                if peak:
                    v["mfu"] = v["model_flops_per_iteration"] / v["iteration_s"] / peak
        save("model flops")
    print(json.dumps({k: v for k, v in result.items() if k not in ("anatomy", "flops_meta")}, indent=2, default=float))
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
