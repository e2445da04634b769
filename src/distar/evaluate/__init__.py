"""Evaluation with the paper's protocol (METHOD.md §7), resumable, with an HTML report: the step. The protocol's
defaults and record are `protocol.py`, the models' sampling `sampler.py`, the report `report.py`.

Parti prompts → ImageReward, aesthetic, PickScore, CLIP score; the HPSv2 benchmark prompts (anime, concept-art,
paintings, photo) → HPSv2.1 per style and averaged. One image per prompt; the noise of a prompt comes from a seed
derived from (seed, prompt id), so results do not depend on batching or on where a resumed run restarts. Scores
are reported on the paper's scales (PickScore /100, HPSv2.1 ×100).

Models: an exported pipeline (`distar export`), generated in one step at t*; or `reference:N`, the pipeline with
its own scheduler, N steps and CFG (the baseline protocol of the paper's SDXL rows).

Every metrics.json carries its protocol (prompt sets and their sha256, seeds, images per prompt, t*, the
baselines' CFG, reward models with sources and revisions, precision, image size) and the protocol's digest;
numbers are compared only under one protocol (`compare_to`, `distar compare`), and a difference is named by field.
Baselines (the initial generator, the 50-step reference) are evaluated once per (model, protocol) and reused
(`evaluate_baseline`).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from distar import sources, storage, tiny_preset
from distar.errors import UserError
from distar.evaluate import protocol as P
from distar.evaluate.protocol import (
    ABLATION_SOURCE,
    PAPER,
    PAPER_ABLATION,
    Prompt,
    check_same_protocol,
    load_prompts,
    protocol_difference,
    protocol_digest,
)
from distar.evaluate.report import render_report
from distar.evaluate.sampler import Sampler, model_record
from distar.prompts import HPS_STYLES
from distar.rewards import PAPER_SCALE  # the one unit of each reward, shared with training
from distar.stop import Preempted, StopSignals


@dataclass
class EvaluateConfig:
    model: str
    """An exported pipeline (directory or URI), or `reference:N` for a pipeline sampled with N steps and CFG."""
    out: str
    """Output URI: metrics.json, scores.parquet, images/, report.html."""
    baseline: str | None = None
    """Evaluated under the same protocol: another pipeline, `unet:SOURCE` (the initial generator, e.g.
    unet:tianweiy/DMD2:dmd2_sdxl_1step_unet_fp16.bin) or `reference:N` (both with --reference)."""
    reference: str | None = None
    """The pipeline `reference:N` samples (SDXL base by default for the sdxl setting)."""
    prompts: str = P.PARTI_PROMPTS
    """Parti prompts (TSV with Prompt and Category columns, or any file `distar curate` reads)."""
    hps_prompts: str | None = None
    """HPSv2 benchmark prompts: a directory/URI of anime.json, concept-art.json, paintings.json, photo.json."""
    rewards: list[str] = field(default_factory=lambda: list(P.METRICS))
    """Metrics to compute: the paper's five by default."""
    sources: dict[str, str] = field(default_factory=dict)
    """Model source per reward, where not the default (as in the trainer's reward.sources)."""
    heads: dict[str, str] = field(default_factory=dict)
    """Head file per reward (aesthetic)."""
    cache_dir: str | None = None
    """Model cache written by `distar cache`."""
    max_prompts: int = 0
    """Use only the first N prompts of each set (0: all)."""
    batch_size: int = 4
    """Images generated and scored at a time."""
    seed: int = P.SEED
    """Seed of the per-prompt noise."""
    t_star: int | None = None
    """The one-step generator's time; None: what the exported model's distar.json records (else its backbone's
    default)."""
    guidance_scale: float = P.GUIDANCE_SCALE
    """CFG of `reference:N` sampling."""
    dtype: str = "fp32"
    """Precision of generation (fp32, bf16, fp16); part of the protocol."""
    ema: bool = True
    """Also evaluate the EMA of the generator's weights where the exported pipeline holds it (distar.json names
    it): the `ema` row beside the raw weights' `model`, same prompts and noise."""
    label: str = ""
    """A name for the evaluated model in reports (an ablation variant's name)."""
    run: str | None = None
    """The training run the model comes from (its logs give `distar compare` the training curves)."""
    compare_to: str | None = None
    """A metrics.json (or its directory) evaluated before, e.g. a baseline: shown beside this model's numbers,
    refused when its protocol differs."""
    allow_protocol_mismatch: bool = False
    """Compare with `compare_to` even when the protocols differ (the difference is still reported)."""
    device: str = "auto"


SCORES = {"model": "scores", "ema": "ema_scores", "baseline": "baseline_scores"}
"""Each evaluated model's per-image table in the output: the raw weights, their EMA, the baseline."""


def _load_metrics(config: EvaluateConfig, device):
    from distar.rewards import RewardSpec, load_reward

    models = {}
    for name in config.rewards:
        spec = RewardSpec(name, 1.0, config.sources.get(name), head=config.heads.get(name))
        models[name] = load_reward(spec, cache_dir=config.cache_dir).to(device).eval()
    return models


def scoring_identity(spec: str, proto: dict) -> dict:
    """What a prompt's score depends on besides the prompt: the model and the protocol less the choice of prompts
    (so that an evaluation extended to more prompts reuses the ones it has)."""
    scoring = {k: v for k, v in proto.items() if k not in ("prompts", "max_prompts", "image_size")}
    return {"model": spec, "protocol": protocol_digest(scoring)}


def _check_work(out_fs, work: str, identity: dict, config) -> bool:
    """The score shards under `work` belong to one model under one scoring protocol (`work`/identity.json, written
    with the first shard): a resumed evaluation adds to them only when both are the same; anything else would mix
    two models' scores in one table. True when `work` is claimed already."""
    where = f"{work}/identity.json"
    if out_fs.exists(where):
        theirs = json.loads(out_fs.cat_file(where))
        differ = sorted(k for k in identity.keys() | theirs.keys() if identity.get(k) != theirs.get(k))
        if differ:
            raise UserError(
                f"--out {config.out!r} holds scores of another evaluation (it differs in "
                f"{', '.join(f'{k}: {theirs.get(k)!r} there, {identity.get(k)!r} here' for k in differ)}); choose "
                f"a new --out, or delete {work} to start over"
            )
        return True
    return False


def _evaluate_one(spec: str, role: str, prompts, metrics, config, device, out_fs, out_path, proto: dict) -> dict:
    """Generate and score every prompt not yet done for this model; returns the run's bookkeeping."""
    import pyarrow.parquet as pq
    from tqdm import tqdm

    work = f"{out_path}/work/{role}"
    out_fs.makedirs(work, exist_ok=True)
    identity = scoring_identity(spec, proto) | ({"weights": "ema"} if role == "ema" else {})
    claimed = _check_work(out_fs, work, identity, config)
    done = set()
    for f in out_fs.glob(f"{work}/scores-*.parquet"):
        with out_fs.open(f, "rb") as fh:
            done.update(pq.read_table(fh, columns=["id"]).column("id").to_pylist())
    todo = [p for p in prompts if p.id not in done]
    generated, seconds = 0, 0.0
    sampler = Sampler(spec, config, device, ema=role == "ema") if todo else None
    # a bar with ETA on a terminal (none in a pod's log); SIGINT and SIGTERM stop after the batch in flight
    bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc=f"distar evaluate: {role}", unit="image",
               disable=None, dynamic_ncols=True)  # fmt: skip
    with bar, StopSignals() as stop:
        for start in range(0, len(todo), config.batch_size):
            if stop.received:
                raise Preempted(
                    f"{stop.received}: stopped with {len(prompts) - len(todo) + generated} of {len(prompts)} "
                    f"{role} images scored and kept under {work}; run the same command again to resume"
                )
            batch = todo[start : start + config.batch_size]
            seconds += _evaluate_batch(batch, sampler, metrics, role, work, out_fs, out_path, identity, claimed)
            generated, claimed = generated + len(batch), True
            bar.update(len(batch))
    return {"generated": generated, "skipped": len(done), "generation_seconds": seconds}


def _evaluate_batch(batch, sampler, metrics, role, work, out_fs, out_path, identity, claimed) -> float:
    """Generate and score one batch, then write its images and its score shard; returns the generation's seconds."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    began = time.perf_counter()
    images = sampler(batch)
    seconds = time.perf_counter() - began
    rows = {
        "id": [p.id for p in batch],
        "prompt": [p.text for p in batch],
        "group": [p.group for p in batch],
        "set": [p.set for p in batch],
        "image": [],
        "seconds_per_image": [],
    }
    for name, model in metrics.items():
        wanted = [i for i, p in enumerate(batch) if (p.set == "hps") == (name == "hpsv2.1")]
        values = [float("nan")] * len(batch)
        if wanted:
            with torch.no_grad():
                scores = model(images[wanted], [batch[i].text for i in wanted]).float().cpu() * PAPER_SCALE[name]
            for i, v in zip(wanted, scores.tolist(), strict=True):
                values[i] = v
        rows[name] = values
    for p, img in zip(batch, images, strict=True):
        name = f"images/{role}/{p.id}.png"
        buf = io.BytesIO()
        Image.fromarray((img.permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")).save(buf, "PNG")
        out_fs.makedirs(f"{out_path}/images/{role}", exist_ok=True)
        out_fs.pipe_file(f"{out_path}/{name}", buf.getvalue())
        rows["image"].append(name)
        rows["seconds_per_image"].append((time.perf_counter() - began) / len(batch))
    buf = io.BytesIO()
    pq.write_table(pa.table(rows), buf)
    # one shard per finished batch, named by its first prompt, written whole or not at all: a crash loses at most
    # the batch in flight, and a retry never reads half a shard
    if not claimed:
        storage.write_json(out_fs, f"{work}/identity.json", identity)
    storage.write_bytes(out_fs, f"{work}/scores-{batch[0].id}.parquet", buf.getvalue())
    return seconds


def _read_scores(out_fs, out_path, role, prompts):
    """The scores of `prompts` (a prompt id names its text): shards may hold others, of an evaluation that took
    more prompts or a prompt file since edited."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    tables = []
    for f in sorted(out_fs.glob(f"{out_path}/work/{role}/scores-*.parquet")):
        with out_fs.open(f, "rb") as fh:
            tables.append(pq.read_table(fh))
    table = pa.concat_tables(tables, promote_options="default")
    return table.filter(pc.is_in(table.column("id"), pa.array([p.id for p in prompts])))


def summarise(table, rewards) -> dict:
    import math

    rows = table.to_pylist()
    summary = {}
    for name in rewards:
        if name == "hpsv2.1":
            per_style = {}
            for style in HPS_STYLES:
                v = [r[name] for r in rows if r["set"] == "hps" and r["group"] == style and not math.isnan(r[name])]
                if v:
                    per_style[style] = sum(v) / len(v)
            if per_style:
                summary[name] = sum(per_style.values()) / len(per_style)
                summary.update({f"hpsv2.1/{s}": v for s, v in per_style.items()})
        else:
            v = [r[name] for r in rows if r["set"] == "parti" and not math.isnan(r[name])]
            if v:
                summary[name] = sum(v) / len(v)
    secs = [r["seconds_per_image"] for r in rows]
    summary["seconds_per_image"] = sum(secs) / len(secs)
    summary["images"] = len(rows)
    return summary


def _image_size(out_fs, out_path: str, role: str) -> int | None:
    from PIL import Image

    found = out_fs.glob(f"{out_path}/images/{role}/*.png")
    if not found:
        return None
    with out_fs.open(sorted(found)[0], "rb") as fh:
        return max(Image.open(fh).size)


def evaluate(config: EvaluateConfig, read: tuple[list[Prompt], dict] | None = None) -> dict:
    """`read`: the prompts and the protocol, where the caller has read them already (`evaluate_baseline`)."""
    import pyarrow.parquet as pq

    storage.check_output("--out", config.out)
    if config.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {config.batch_size}")
    unknown = sorted(set(config.rewards) - set(PAPER_SCALE))
    if unknown:
        raise UserError(f"unknown metric(s) {unknown}; choose from {', '.join(PAPER_SCALE)}")
    device = torch.device(
        "cuda"
        if config.device == "auto" and torch.cuda.is_available()
        else ("cpu" if config.device == "auto" else config.device)
    )
    tiny_preset.prepare(asdict(config))
    record = model_record(config.model, config.cache_dir, config.reference)
    config = _with_t_star(config, record)
    prompts, proto = read if read is not None else _read_protocol(config)
    compared = load_metrics(config.compare_to) if config.compare_to else None
    if compared is not None:  # before any image is generated: a mismatch costs nothing
        theirs = {k: v for k, v in compared.get("protocol", {}).items() if k != "image_size"}
        check_same_protocol(proto, theirs, f"--compare-to {config.compare_to!r}", config.allow_protocol_mismatch)
    metrics = _load_metrics(config, device)
    out_fs, out_path = storage.filesystem(config.out)
    out_path = out_path.rstrip("/")
    runs = {"model": _evaluate_one(config.model, "model", prompts, metrics, config, device, out_fs, out_path, proto)}
    if config.ema and record.get("ema"):
        runs["ema"] = _evaluate_one(config.model, "ema", prompts, metrics, config, device, out_fs, out_path, proto)
    if config.baseline:
        runs["baseline"] = _evaluate_one(
            config.baseline, "baseline", prompts, metrics, config, device, out_fs, out_path, proto
        )
    results, tables = {}, {}
    for role in runs:
        tables[role] = _read_scores(out_fs, out_path, role, prompts)
        results[role] = summarise(tables[role], config.rewards)
        buf = io.BytesIO()
        pq.write_table(tables[role], buf)
        out_fs.pipe_file(f"{out_path}/{SCORES[role]}.parquet", buf.getvalue())
    proto["image_size"] = _image_size(out_fs, out_path, "model")
    mismatch = None
    if compared is not None:
        what = f"--compare-to {config.compare_to!r}"
        mismatch = check_same_protocol(proto, compared.get("protocol", {}), what, config.allow_protocol_mismatch)
        results["compared"] = compared["results"]["model"]
    report = {
        "model": config.model,
        "label": config.label,
        "run": config.run,
        "baseline": config.baseline,
        "compared_to": None
        if compared is None
        else {"metrics": config.compare_to, "model": compared.get("model"), "protocol_mismatch": mismatch},
        "results": results,
        "runs": runs,
        "backbone": record["backbone"],
        "paper": PAPER,
        "protocol": proto,
        "protocol_digest": protocol_digest(proto),
        "config": asdict(config),
        "prompts": len(prompts),
    }
    storage.write_json(out_fs, f"{out_path}/metrics.json", report)
    out_fs.pipe_file(f"{out_path}/report.html", render_report(report, tables, out_fs, out_path).encode())
    return report


def load_metrics(path: str | Path) -> dict:
    """A metrics.json, given as the file or the evaluation directory that holds it."""
    path = str(path) if str(path).endswith(".json") else f"{str(path).rstrip('/')}/metrics.json"
    fs, p = storage.filesystem(path)
    if not fs.exists(p):
        raise UserError(f"{path!r}: no metrics.json there (an output of distar evaluate)")
    return json.loads(fs.cat_file(p))


def _with_t_star(config: EvaluateConfig, record: dict | None = None) -> EvaluateConfig:
    """The config with t* filled in from the model (its `model_record`, read here unless given) where it was left
    to it."""
    if config.t_star is not None:
        return config
    record = record or model_record(config.model, config.cache_dir, config.reference)
    return replace(config, t_star=record["t_star"])


def _read_protocol(config: EvaluateConfig) -> tuple[list[Prompt], dict]:
    """The prompts and the protocol of a config whose t* is filled in (`_with_t_star`)."""
    prompts = load_prompts(config)
    return prompts, P.record(config, prompts)


def baseline_key(config: EvaluateConfig, proto: dict) -> str:
    """The identity of a baseline's numbers: the model (source, revision, cached files), the pipeline it runs in,
    and the protocol (`protocol`)."""
    identity = {
        "model": config.model,
        "model_provenance": sources.provenance(config.model, config.cache_dir),
        "reference": None if config.reference is None else sources.provenance(config.reference, config.cache_dir),
        "protocol": protocol_digest(proto),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def evaluate_baseline(config: EvaluateConfig, root: str) -> dict:
    """A baseline (the initial generator `unet:…`, the reference `reference:N`) evaluated once per (model,
    protocol): its results live at {root}/{key}; a later call with the same model and protocol reads them and
    generates nothing. {root}/{key}/uses.json records every call and what it generated."""
    tiny_preset.prepare(asdict(config))
    config = _with_t_star(config)
    read = _read_protocol(config)  # once: the key and the evaluation use the same prompts and protocol
    key = baseline_key(config, read[1])
    out = f"{str(root).rstrip('/')}/{key}"
    fs, path = storage.filesystem(out)
    done = f"{path}/metrics.json"
    reused = fs.exists(done)
    report = json.loads(fs.cat_file(done)) if reused else evaluate(replace(config, out=out), read)
    generated = 0 if reused else report["runs"]["model"]["generated"]
    uses_file = f"{path}/uses.json"
    uses = json.loads(fs.cat_file(uses_file)) if fs.exists(uses_file) else []
    uses.append({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "reused": reused, "generated": generated})
    storage.write_json(fs, uses_file, uses)
    return {**report, "baseline_key": key, "out": out, "reused": reused, "generated": generated}


__all__ = [
    "ABLATION_SOURCE",
    "PAPER",
    "PAPER_ABLATION",
    "EvaluateConfig",
    "Prompt",
    "Sampler",
    "check_same_protocol",
    "evaluate",
    "evaluate_baseline",
    "load_metrics",
    "load_prompts",
    "protocol_difference",
    "protocol_digest",
]
