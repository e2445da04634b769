"""make bench: measurements taken side by side in one run, reported as ratios.

Now: one-step generation against the reference's 50-step CFG sampling on the same backbone (the tiny
SDXL-shaped preset on CPU), both through stock diffusers StableDiffusionXLPipeline, latents only.
Writes docs/PERFORMANCE.md and docs/performance.json.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def sampling(repeats: int = 5) -> dict:
    from diffusers import EulerDiscreteScheduler, LCMScheduler, StableDiffusionXLPipeline

    from distar.models.tiny import build_tiny_sdxl

    with tempfile.TemporaryDirectory() as tmp:
        pipe = StableDiffusionXLPipeline.from_pretrained(build_tiny_sdxl(Path(tmp) / "sdxl"))
    pipe.set_progress_bar_config(disable=True)
    one = LCMScheduler.from_config(pipe.scheduler.config)
    many = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    prompts = ["a photo of a cat"] * 4

    def one_step():
        pipe.scheduler = one
        pipe(prompts, num_inference_steps=1, timesteps=[399], guidance_scale=0.0, height=64, width=64,
             output_type="latent", generator=torch.Generator().manual_seed(0))  # fmt: skip

    def fifty_step_cfg():
        pipe.scheduler = many
        pipe(prompts, num_inference_steps=50, guidance_scale=7.5, height=64, width=64, output_type="latent",
             generator=torch.Generator().manual_seed(0))  # fmt: skip

    t1, t50 = _time(one_step, repeats), _time(fifty_step_cfg, repeats)
    return {"one_step_s": t1, "fifty_step_cfg_s": t50, "ratio": t1 / t50, "batch": len(prompts), "preset": "tiny"}


def main() -> int:
    torch.manual_seed(0)
    results = {"date": date.today().isoformat(), "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} "
               f"threads", "torch": torch.__version__, "sampling": sampling()}  # fmt: skip
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    (docs / "performance.json").write_text(json.dumps(results, indent=2))
    s = results["sampling"]
    (docs / "PERFORMANCE.md").write_text(f"""# Performance

Measured by `make bench` on {results["date"]} ({results["machine"]}, torch {results["torch"]}). Each figure is a
ratio of two measurements taken side by side in the same run (median of 5 after one warm-up).

## Sampling: one step against the reference's 50-step CFG sampling

Same backbone (the tiny SDXL-shaped preset), stock diffusers StableDiffusionXLPipeline, batch {s["batch"]}, latents
only (no VAE decode): one step with LCMScheduler at t = 399 and no guidance, against 50 Euler steps with CFG 7.5
(two UNet passes per step).

| one step | 50 steps + CFG | ratio | target |
|---|---|---|---|
| {s["one_step_s"] * 1e3:.1f} ms | {s["fifty_step_cfg_s"] * 1e3:.1f} ms | {100 * s["ratio"]:.2f} % | ≤ 3 % |

One step is one UNet pass on B latents; 50 CFG steps are 50 passes on 2B (conditional and unconditional
batched), so the UNet-bound ratio is about 1/50 × (cost at B / cost at 2B), near 1 % where cost grows linearly
with the batch. Per-call overhead (prompt encoding, scheduler set-up) weighs on the one-step side. The
paper reports 1.88 % for DI* against FLUX-dev. The training-step anatomy, curation throughput, memory plan and
the GPU SDXL benchmark are not measured yet.
""")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
