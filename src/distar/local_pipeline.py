"""The whole DAG on this machine: pipelines/distar_sdxl.py under kfp.local's SubprocessRunner, local files.

The tiny arguments put the tiny models in the model cache under the hub ids the SDXL run uses, so training and
evaluation read them exactly as a cluster run reads SDXL and the reward models: from the cache, offline.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

from distar import sources, tiny_preset
from distar.errors import UserError

SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
DMD2 = "tianweiy/DMD2:dmd2_sdxl_1step_unet_fp16.bin"
SD35M = "stabilityai/stable-diffusion-3.5-medium"
FLUX_DEV, FLUX_SCHNELL = "black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-schnell"
PRESETS = ("tiny", "tiny-sd3", "tiny-flux", "sdxl")
"""run-local's presets: each tiny one stands its tiny models in for the real ones' hub ids (so the pipeline's
cache step, the train step's offline loading and evaluate read them as they would the real models)."""


def _models(preset: str) -> tuple[list[str], list[str]]:
    """(cache items: real id = tiny source, train overrides naming the real ids) of a tiny preset's family."""
    t = tiny_preset.PREFIX
    if preset == "tiny-sd3":
        return [f"{SD35M}={t}sd3"], [f"model.reference={SD35M}", "model.generator_init=reference"]
    if preset == "tiny-flux":
        items = [f"{FLUX_DEV}={t}flux", f"{FLUX_SCHNELL}={t}flux-schnell"]
        return items, [f"model.reference={FLUX_DEV}", f"model.generator_init={FLUX_SCHNELL}"]
    return [f"{SDXL}={t}sdxl", f"{DMD2}={t}dmd2_unet.safetensors"], [
        f"model.reference={SDXL}", f"model.generator_init={DMD2}"
    ]  # fmt: skip


def tiny_arguments(preset: str = "tiny") -> dict:
    t = tiny_preset.PREFIX
    models, model_overrides = _models(preset)
    cache_models = [
        *models,
        f"yuvalkirstain/PickScore_v1={t}rewards/pickscore",
        f"laion/CLIP-ViT-H-14-laion2B-s32B-b79K={t}rewards/pickscore",
        f"openai/clip-vit-large-patch14={t}rewards/clip",
        f"xswu/HPSv2-converted={t}rewards/hpsv2.1",
        f"THUDM/ImageReward-converted={t}rewards/imagereward",
        f"camenduru/improved-aesthetic-predictor:sac+logos+ava1-l14-linearMSE.pth="
        f"{t}rewards/aesthetic/aesthetic_head.safetensors",
        f"prompts/parti:prompts.parquet={t}prompts/part-00000.parquet",
        f"prompts/hpsv2={t}hps",
    ]
    return {
        "prompt_sources": [str(sources.tiny_path("prompts/part-00000.parquet"))],
        "tokenizer": f"{t}sdxl",
        "eval_fraction": 0.05,
        "cache_models": cache_models,
        "preset": preset,
        "train_overrides": [
            *model_overrides,
            "reward.sources={}",
            "steps=4",
            "checkpoint.every=2",
            "log.progress=false",
        ],
        "nproc_per_node": 2,
        "gpus_per_node": 0,
        "max_restarts": 0,
        "eval_prompts": "prompts/parti/prompts.parquet",
        "eval_max_prompts": 4,
        "eval_batch_size": 4,
    }


PIPELINES = ("sdxl", "ablation")
# The ablation's local grid: two of Table 3's rows (the DI* and DI++ settings), the reference sampled in 2 steps
TINY_VARIANTS = ("score-rew100", "kl-rew100")


def tiny_ablation_arguments(preset: str = "tiny") -> dict:
    """The ablation's local grid on a tiny family. Its baselines: the initial generator (SDXL: DMD2's raw UNet in
    the reference's pipeline; SD3: the reference itself in one step, the sd3 presets' start; FLUX: the schnell
    pipeline in one step) and the reference in 2 steps."""
    from distar.compare import TABLE3

    variants = [{k: v[k] for k in ("name", "overrides", "paper")} for v in TABLE3 if v["name"] in TINY_VARIANTS]
    initial, reference = {"tiny-sd3": (SD35M, SD35M), "tiny-flux": (FLUX_SCHNELL, FLUX_DEV)}.get(
        preset, (f"unet:{DMD2}", SDXL)
    )
    return {
        **tiny_arguments(preset),
        "variants": variants,
        "initial": initial,
        "reference": reference,
        "reference_steps": "reference:2",
    }


def pipeline_module(name: str = "sdxl"):
    if name not in PIPELINES:
        raise UserError(f"--pipeline {name!r}: choose one of {', '.join(PIPELINES)}")
    path = Path(__file__).resolve().parents[2] / "pipelines" / f"distar_{name}.py"
    if not path.is_file():
        raise UserError(f"run-local needs the project's source checkout ({path} is missing)")
    spec = importlib.util.spec_from_file_location(f"distar_{name}_pipeline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_local(
    preset: str, root: str | Path, overrides: dict | None = None, pipeline: str = "sdxl", log: Path | None = None
) -> Path:
    """Run the DAG under kfp.local; returns the run's directory ({root}/distar-{pipeline}-{timestamp}). With `log`,
    everything kfp.local and the steps print (executor inputs and outputs as JSON, the steps' own logs) goes to
    that file, and the terminal gets one line as each step starts and ends."""
    import warnings

    from kfp import local

    # kfp.local warns, for every task, that resource requests do nothing here and that the image is not run
    # (the steps run in this environment): true, expected, and said once in the docs instead
    warnings.filterwarnings("ignore", message=r"Task '.*': settings .* have no effect", category=UserWarning)
    warnings.filterwarnings("ignore", message=r"You may be attemping to run a task", category=RuntimeWarning)

    if preset not in PRESETS:
        raise UserError(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}")
    module = pipeline_module(pipeline)
    is_tiny = preset.startswith("tiny")
    arguments = (tiny_arguments(preset) if pipeline == "sdxl" else tiny_ablation_arguments(preset)) if is_tiny else {}
    arguments.update(overrides or {})
    if is_tiny:
        tiny_preset.materialize()
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    # The persistent roots a cluster run keeps on object storage, here beside kfp.local's runs
    arguments.setdefault("cache_root", str(root / "model-cache"))
    arguments.setdefault("runs_root", str(root / "training-runs"))
    before = {p for p in root.iterdir() if p.name not in ("model-cache", "training-runs")}
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    started = time.time()
    if log is None:
        module.build("local")(**arguments)
    else:
        with StepLines(log):
            module.build("local")(**arguments)
    runs = sorted(
        {p for p in root.iterdir() if p.is_dir() and p.name not in ("model-cache", "training-runs")} - before,
        key=lambda p: p.stat().st_mtime,
    )
    if not runs:
        raise RuntimeError(f"kfp.local wrote no run under {root} (started {started})")
    return runs[-1]


class StepLines:
    """Send this process's stdout and stderr (and its children's: the file descriptors, not sys.stdout) to a log
    file, and print to the terminal one line per step as kfp.local starts and finishes it, with its time. On a
    failure the log's last lines follow, so the error is on the screen as well."""

    PATTERN = r"Executing task '?([\w-]+)'?|Task '?([\w-]+)'? finished with status (\w+)"

    def __init__(self, log: Path):
        self.log = Path(log)

    def __enter__(self):
        import os
        import sys
        import threading

        self.log.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        self.terminal = os.fdopen(os.dup(1), "w", buffering=1)
        print(f"distar run-local: the steps' own output goes to {self.log} (-v shows it here)", file=self.terminal)
        self.saved = (os.dup(1), os.dup(2))
        self.fd = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(self.fd, 1)
        os.dup2(self.fd, 2)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._follow, daemon=True)
        self.thread.start()
        return self

    def _follow(self) -> None:
        import re

        pattern, began = re.compile(self.PATTERN), {}
        with self.log.open(errors="replace") as fh:
            while True:
                line = fh.readline()
                if not line:
                    if self.done.is_set():
                        return
                    time.sleep(0.2)
                    continue
                match = pattern.search(re.sub(r"\x1b\[[0-9;]*m", "", line))
                if match and match.group(1):
                    began[match.group(1)] = time.time()
                    print(f"  {match.group(1)}: running", file=self.terminal)
                elif match:
                    took = time.time() - began.get(match.group(2), time.time())
                    print(f"  {match.group(2)}: {match.group(3).lower()} ({took:.0f} s)", file=self.terminal)

    def __exit__(self, kind, error, tb):
        import os
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        self.done.set()
        self.thread.join(timeout=10)
        os.dup2(self.saved[0], 1)
        os.dup2(self.saved[1], 2)
        for fd in (*self.saved, self.fd):
            os.close(fd)
        if error is not None:
            tail = self.log.read_text(errors="replace").splitlines()[-40:]
            print("\n".join(["distar run-local: a step failed; the log's last lines:", *tail]), file=self.terminal)
        self.terminal.close()
        return False


# What each output of a local run shows, in the order the DAG writes them.
OUTPUTS = [
    ("curate/prompts", "the curated prompt set: train/ and eval/ shards; stats.json counts what each rule dropped"),
    ("curate/summary", "the same counts as Markdown"),
    ("cache/model_cache", "the model cache's manifest (every file's sha256); the cache itself is under model-cache/"),
    (
        "train/run",
        "the training run's record: its directory under training-runs/ (checkpoints/step_*/, "
        "logs/metrics.jsonl, samples/) and the final checkpoint",
    ),
    ("train/report", "the training report: a panel per quantity (reward, divergence, losses, …), sample grids"),
    (
        "export/pipeline",
        "the export's record: it names the diffusers pipeline for one-step sampling (fp16 generator, model card) "
        "written beside the run under training-runs/",
    ),
    (
        "evaluate/evaluation",
        "the evaluation's record: it names the directory under training-runs/ that holds the images, the score "
        "shards (a retried step resumes from them), scores.parquet and metrics.json",
    ),
    ("evaluate/metrics", "the evaluation metrics on the paper's scales"),
    ("evaluate/report", "report.html: the metrics table (baseline, Δ, spread, the paper's rows), images, histograms"),
    ("baseline/report", "a baseline's evaluation (stored once per model and protocol under training-runs/baselines)"),
    ("compare/report", "the ablation: a row per variant beside the paper and the baselines, images, curves"),
    ("compare/table", "the same table as Markdown"),
]

TINY_NOTE = (
    "The tiny preset's models are random, so every image is noise by design. What a tiny run shows is the plumbing: "
    "loss/generator, divergence and reward change from step to step in logs/metrics.jsonl, a checkpoint is "
    "complete, stock diffusers loads the export, and the report lists every metric. Pictures worth looking at need "
    "real weights: the sdxl preset on a GPU (docs/TRAINING.md)."
)


def describe(run: Path, preset: str) -> list[str]:
    """Closing lines for a finished local run: where each output is and what it shows. kfp.local names an HTML
    artifact without a suffix, which a browser shows as source: each gets a copy named .html, and the lines give
    file:// URLs."""
    import shutil

    lines = [f"pipeline run: {run}"]
    for rel, what in OUTPUTS:
        path = run / rel
        if not path.exists():
            continue
        if rel.endswith("/report"):
            path = Path(shutil.copyfile(path, path.with_suffix(".html")))
        lines.append(f"  {path.resolve().as_uri()}\n      {what}")
    if preset.startswith("tiny"):
        lines.append(TINY_NOTE)
    return lines
