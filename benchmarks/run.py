"""make bench: measurements taken side by side in one run, reported as ratios; writes docs/PERFORMANCE.md and
docs/performance.json.

1. Training-step anatomy on the tiny preset and a CPU-sized SDXL shape ("medium"): the trainer's iteration and
   updates timed whole against the sum of their parts timed alone (benchmarks/anatomy.py).
2. Sampling: one step against the reference's 50-step CFG sampling, stock diffusers pipeline, same backbone.
3. Curation: `distar curate` against a plain-Python implementation of the same rules over 1M synthetic prompts.
4. Memory: `distar plan`'s prediction against the measured peak (CPU presets in fresh processes; the SDXL
   iteration measured on a GPU by benchmarks/gpu_sdxl_step.py, docs/gpu/), and the SDXL 8×80 GB plan.
5. The GPU SDXL iteration: the newest docs/gpu/*.json that benchmarks/gpu_sdxl_step.py wrote, with its model
   FLOPs counted here on "meta".
6. Regional compilation: the tiny UNet's forward+backward, every block compiled, against eager (CPU).
7. Precision and layout: bf16 weight copies made once, channels_last, the VAE decoder in bf16 (benchmarks/precision.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import unicodedata
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import anatomy  # noqa: E402
import precision  # noqa: E402

from distar.models.architectures import ARCHITECTURES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30
PRESETS = {  # name → (architecture, preset, overrides): one process, the networks of the architecture
    "tiny": ("tiny", "tiny", ["parallel.strategy=none", "data.resolution=64"]),
    "medium": ("medium", "tiny", ["parallel.strategy=none", "data.resolution=128"]),
}


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


# -- 1. anatomy ---------------------------------------------------------------------------------------


def step_anatomy(name: str, repeats: int) -> dict:
    arch, preset, overrides = PRESETS[name]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = anatomy.build_trainer(ARCHITECTURES[arch](), preset, overrides, Path(tmp))
        result = anatomy.anatomy(trainer, repeats=repeats)
    return {"preset": preset, "arch": arch, "overrides": overrides, **result}


# -- 2. sampling --------------------------------------------------------------------------------------


def sampling(repeats: int = 5) -> dict:
    from diffusers import EulerDiscreteScheduler, LCMScheduler, StableDiffusionXLPipeline

    from distar.backbones.sdxl import build_tiny_sdxl

    with tempfile.TemporaryDirectory() as tmp:
        pipe = StableDiffusionXLPipeline.from_pretrained(build_tiny_sdxl(Path(tmp) / "sdxl"))
    pipe.set_progress_bar_config(disable=True)
    one = LCMScheduler.from_config(pipe.scheduler.config)
    many = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    prompts = ["a photo of a cat"] * 4

    def one_step():
        pipe.scheduler = one
        pipe(
            prompts,
            num_inference_steps=1,
            timesteps=[399],
            guidance_scale=0.0,
            height=64,
            width=64,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        )

    def fifty_step_cfg():
        pipe.scheduler = many
        pipe(
            prompts,
            num_inference_steps=50,
            guidance_scale=7.5,
            height=64,
            width=64,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        )

    t1, t50 = _time(one_step, repeats), _time(fifty_step_cfg, repeats)
    return {"one_step_s": t1, "fifty_step_cfg_s": t50, "ratio": t1 / t50, "batch": len(prompts), "preset": "tiny"}


# -- 3. curation --------------------------------------------------------------------------------------

WORDS = (
    "a photo of the an oil painting watercolor portrait close-up wide-angle shot cat dog horse astronaut robot "
    "castle city forest mountain lake ocean desert street market kitchen library cathedral riding reading "
    "flying sitting standing under over beside at night dawn sunset in rain snow fog neon golden red blue "
    "green purple tiny giant ancient futuristic cozy detailed 4k 8k trending on artstation by greg style "
    "of van gogh monet studio ghibli cinematic lighting bokeh"
).split()


def synthetic_prompts(n: int, seed: int = 0) -> list[str]:
    """Prompts of 3–24 words from an image-prompt vocabulary, with stray whitespace, some empty rows and
    repeats (as scraped prompt sets have)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 50 == 0 and out:
            out.append(out[rng.randrange(len(out))])
            continue
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 24))]
        out.append(("  " if i % 7 == 0 else "") + " ".join(words) + ("\t" if i % 11 == 0 else ""))
    return out


def plain_python_curation(prompts: list[str], tokenizer, max_tokens: int = 77, eval_fraction: float = 0.02):
    """The same rules written the obvious way: one prompt at a time, one tokenizer call per prompt."""
    import pyarrow as pa

    body, seen = max_tokens - 2, set()
    rows = {"train": [], "eval": []}
    for value in prompts:
        if not isinstance(value, str):
            continue
        text = " ".join(unicodedata.normalize("NFC", value).split())
        if not text:
            continue
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        n = len(enc["input_ids"])
        if n > body:
            text, n = text[: enc["offset_mapping"][body - 1][1]].rstrip(), body
        digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
        if digest in seen:
            continue
        seen.add(digest)
        split = "eval" if int.from_bytes(digest, "big") / 2**64 < eval_fraction else "train"
        rows[split].append((text, digest.hex(), n + 2))
    return {
        s: pa.table({"prompt": [r[0] for r in v], "id": [r[1] for r in v], "tokens": [r[2] for r in v]})
        for s, v in rows.items()
    }


def curation(n: int) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from distar.curate import CurateConfig, _token_counts, curate
    from distar.tiny_text import write_tiny_clip_tokenizer

    prompts = synthetic_prompts(n)
    with tempfile.TemporaryDirectory() as tmp:
        source = f"{tmp}/prompts.parquet"
        pq.write_table(pa.table({"prompt": prompts}), source)
        tokenizer_dir = write_tiny_clip_tokenizer(f"{tmp}/tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        tokenizer.model_max_length = 1 << 30
        start = time.perf_counter()
        stats = curate(CurateConfig([source], f"{tmp}/curated", tokenizer=str(tokenizer_dir)))
        ours = time.perf_counter() - start
        start = time.perf_counter()
        baseline_tables = plain_python_curation(pq.read_table(source).column("prompt").to_pylist(), tokenizer)
        baseline = time.perf_counter() - start
        kept = [t.strip() for t in prompts if t.strip()]
        start = time.perf_counter()
        _token_counts(tokenizer, [" ".join(t.split()) for t in kept])
        tokenize = time.perf_counter() - start
    same = stats["rows_out"] == sum(t.num_rows for t in baseline_tables.values())
    return {
        "prompts": n,
        "distar_s": ours,
        "plain_python_s": baseline,
        "speedup": baseline / ours,
        "distar_prompts_per_min": n / ours * 60,
        "plain_python_prompts_per_min": n / baseline * 60,
        "tokenizer_alone_s": tokenize,
        "rows_out": stats["rows_out"],
        "same_rows_out": same,
        "tokenizer": "byte-level CLIP BPE without merges (the tiny preset's): one token per character",
    }


# -- 4. memory ----------------------------------------------------------------------------------------


def memory(gpu_runs: list[dict]) -> dict:
    from distar.plan import plan
    from distar.train.config import load_config

    out = {"cpu": {}, "gpu": {}}
    for name, (arch, preset, overrides) in PRESETS.items():
        probe = subprocess.run(
            [sys.executable, str(Path(__file__).parent / "memory_probe.py"), arch, preset, *overrides],
            capture_output=True,
            text=True,
            check=True,
        )
        measured = json.loads(probe.stdout.strip().splitlines()[-1])["measured_bytes"]
        predicted = plan(load_config(preset, ["data.prompts=unused", *overrides]), 1, arch)["peak_bytes"]
        out["cpu"][name] = {"measured_bytes": measured, "predicted_bytes": predicted, "ratio": predicted / measured}
    for run in gpu_runs:
        variant = run.get("autocast+foreach")
        if not variant or "error" in variant:
            continue
        overrides = [
            "data.prompts=unused",
            "parallel.strategy=none",
            f"data.batch_size={run['batch']}",
            f"data.resolution={run['resolution']}",
        ]
        predicted = plan(load_config("sdxl", overrides), 1, run["arch"])["peak_bytes"]
        measured = variant["memory_iterations"]["peak_allocated_gb"] * GiB
        out["gpu"][run["device"]] = {
            "measured_bytes": measured,
            "predicted_bytes": predicted,
            "ratio": predicted / measured,
            "date": run["date"],
        }
    sdxl = plan(load_config("sdxl", ["data.prompts=unused"]), 8, "sdxl")
    out["sdxl_8x80"] = sdxl
    return out


# -- 5. GPU -------------------------------------------------------------------------------------------


# -- 6. regional compilation -----------------------------------------------------------------------------


def regional_compile(repeats: int) -> dict:
    """The tiny UNet's forward+backward with every block compiled in place (parallel.compile) against eager, side
    by side after a warm-up that pays the compile (timed on its own); the largest output difference."""
    import copy

    from distar import backbones
    from distar.backbones.sdxl import build_tiny_unet
    from distar.train import parallel

    eager = build_tiny_unet(seed=0)
    compiled = copy.deepcopy(eager)
    for block in parallel.block_modules(backbones.get("sdxl"), compiled):
        block.compile()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 32, 32, generator=g), torch.tensor([300, 800])
    kwargs = {
        "encoder_hidden_states": torch.randn(2, 77, 64, generator=g),
        "added_cond_kwargs": {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.zeros(2, 6)},
    }

    def step(unet):
        out = unet(x, t, **kwargs).sample
        out.square().mean().backward()
        return out.detach()

    start = time.perf_counter()
    out_c = step(compiled)
    compile_s = time.perf_counter() - start
    out_e = step(eager)
    eager_s, compiled_s = [], []
    for _ in range(repeats):  # interleaved rounds
        eager_s.append(_time(lambda: step(eager), 1))
        compiled_s.append(_time(lambda: step(compiled), 1))
    e, c = statistics.median(eager_s), statistics.median(compiled_s)
    return {
        "eager_s": e,
        "compiled_s": c,
        "ratio": c / e,
        "first_call_s": compile_s,
        "max_abs_diff": float((out_c - out_e).abs().max()),
    }


def gpu_runs() -> list[dict]:
    runs = []
    for path in sorted((ROOT / "docs" / "gpu").glob("*.json")):
        run = json.loads(path.read_text())
        if "variants" in run:  # the side-by-side format
            run["file"] = str(path.relative_to(ROOT))
            runs.append(run)
    return runs


def sdxl_model_flops() -> dict:
    from gpu_sdxl_step import model_flops

    with tempfile.TemporaryDirectory() as tmp:
        return model_flops(
            "sdxl", "sdxl", ["data.batch_size=2", "data.resolution=1024", "parallel.strategy=none"], Path(tmp)
        )


# -- report -------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=1_000_000, help="synthetic prompts for the curation race")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    runs = gpu_runs()
    results = {
        "date": date.today().isoformat(),
        "torch": torch.__version__,
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        # this 2-core machine's timings scatter by ±10 %: more rounds, medians
        "anatomy": {
            name: step_anatomy(name, 3 * args.repeats if name == "tiny" else 2 * args.repeats + 1) for name in PRESETS
        },
        "sampling": sampling(args.repeats),
        "curation": curation(args.prompts),
        "memory": memory(runs),
        "compile": regional_compile(2 * args.repeats + 1),
        "precision": precision.measure(args.repeats),
        "gpu": runs,
    }
    if runs:
        results["sdxl_model_flops"] = sdxl_model_flops()
    docs = ROOT / "docs"
    (docs / "performance.json").write_text(json.dumps(results, indent=2, default=float))
    from report import performance_markdown

    (docs / "PERFORMANCE.md").write_text(performance_markdown(results))
    print((docs / "PERFORMANCE.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
