"""Evaluation with the paper's protocol (METHOD.md §7), resumable, with an HTML report.

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

import base64
import hashlib
import html
import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from distar import backbones, sources, storage, tiny_preset
from distar.errors import UserError
from distar.prompts import HPS_STYLES, PARTI_URL
from distar.rewards import PAPER_SCALE  # the one unit of each reward, shared with training

PARTI_METRICS = ("imagereward", "aesthetic", "pickscore", "clip")
# METHOD.md §7, the rows a run is compared against.
_METRIC_ORDER = ("imagereward", "aesthetic", "pickscore", "clip", "hpsv2.1")
PAPER = {
    label: dict(zip(_METRIC_ORDER, values, strict=True))
    for label, values in {
        "SDXL (50 steps)": (0.887, 5.72, 0.2274, 32.72, 29.05),
        "DMD2 (start point)": (0.930, 5.51, 0.2249, 32.97, 27.97),
        "Diff-Instruct (KL, CFG only)": (1.058, 5.60, 0.2253, 33.02, 29.70),
        "SIM (score divergence, CFG only)": (1.049, 5.66, 0.2273, 32.93, 30.16),
        "DI++ (KL + reward)": (1.061, 5.58, 0.2260, 32.94, 29.72),
        "DI*": (1.067, 5.74, 0.2304, 32.82, 30.22),
        "DI* longer training": (1.140, 5.83, 0.2331, 32.75, 31.19),
    }.items()
}


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
    prompts: str = PARTI_URL
    """Parti prompts (TSV with Prompt and Category columns, or any file `distar curate` reads)."""
    hps_prompts: str | None = None
    """HPSv2 benchmark prompts: a directory/URI of anime.json, concept-art.json, paintings.json, photo.json."""
    rewards: list[str] = field(default_factory=lambda: ["imagereward", "aesthetic", "pickscore", "clip", "hpsv2.1"])
    """Metrics to compute."""
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
    seed: int = 0
    """Seed of the per-prompt noise."""
    t_star: int = 399
    """The one-step generator's timestep."""
    guidance_scale: float = 7.5
    """CFG of `reference:N` sampling."""
    dtype: str = "fp32"
    """Precision of generation (fp32, bf16, fp16); part of the protocol."""
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


@dataclass
class Prompt:
    id: str
    text: str
    group: str  # Parti category, or the HPS style
    set: str  # "parti" or "hps"


def _prompt_id(set_name: str, text: str, index: int) -> str:
    return f"{set_name}-{index:05d}-{hashlib.blake2b(text.encode(), digest_size=4).hexdigest()}"


def load_prompts(config: EvaluateConfig) -> list[Prompt]:
    from distar.prompts import read_source

    prompts = []
    wanted = set(config.rewards)
    if wanted & set(PARTI_METRICS):
        texts, cats = [], []
        for rows in read_source(sources.local(config.prompts)):
            texts += rows.as_list()
            cats += rows.categories or [None] * len(rows.prompts)
        for i, (t, c) in enumerate(zip(texts, cats, strict=True)):
            if isinstance(t, str) and t.strip():
                prompts.append(Prompt(_prompt_id("parti", t, i), t.strip(), str(c or "all"), "parti"))
        if config.max_prompts:
            prompts = prompts[: config.max_prompts]
    if "hpsv2.1" in wanted:
        if not config.hps_prompts:
            raise UserError(
                "hpsv2.1 is evaluated on the HPSv2 benchmark prompts: pass --hps-prompts (a directory "
                "of anime.json, concept-art.json, paintings.json, photo.json) or drop hpsv2.1"
            )
        fs, path = storage.filesystem(sources.local(config.hps_prompts))
        for style in HPS_STYLES:
            f = f"{path.rstrip('/')}/{style}.json"
            if not fs.exists(f):
                raise UserError(f"--hps-prompts {config.hps_prompts!r} has no {style}.json")
            texts = json.loads(fs.cat_file(f))
            if config.max_prompts:
                texts = texts[: config.max_prompts]
            prompts += [Prompt(_prompt_id(f"hps-{style}", t, i), t, style, "hps") for i, t in enumerate(texts)]
    if not prompts:
        raise UserError("no prompts to evaluate: check --prompts, --hps-prompts and --rewards")
    return prompts


class Sampler:
    """An exported one-step pipeline; `unet:SOURCE`, a raw UNet state dict (the initial generator, e.g. DMD2's
    1-step UNet) in the --reference pipeline, sampled in one step; or `reference:N`, the --reference pipeline with
    its own scheduler, N steps and CFG."""

    def __init__(self, spec: str, config: EvaluateConfig, device: torch.device):
        self.steps = None
        parsed = sources.parse(spec, evaluate_forms=True)
        source, raw = spec, None
        if parsed.kind in ("unet", "reference") and not config.reference:
            raise UserError(f"{spec!r} needs --reference (the pipeline whose UNet it replaces, or that it samples)")
        if parsed.kind == "unet":  # the initial generator: a raw state dict in the reference's pipeline
            raw, source = parsed.inner.text, config.reference
        elif parsed.kind == "reference":
            self.steps = parsed.steps
            source = config.reference
        root = sources.resolve_dir(source, cache_dir=config.cache_dir)
        if not (root / "model_index.json").is_file():
            raise UserError(f"{source!r} is not a diffusers pipeline (no model_index.json); run `distar export`")
        self.backbone = backbones.get(_recorded_backbone(root))
        net = None
        if raw is not None:
            net = self.backbone.load_raw_generator(raw, config.reference, cache_dir=config.cache_dir)
        dtype = sources.parse_dtype(config.dtype)
        self.pipe = self.backbone.load_pipeline(root, dtype, net).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.config, self.device, self.name = config, device, spec
        self.latent_shape = self.backbone.pipeline_latent_shape(self.pipe)

    def noise(self, prompt: Prompt) -> torch.Tensor:
        seed = int.from_bytes(
            hashlib.blake2b(f"{self.config.seed}/{prompt.id}".encode(), digest_size=8).digest(), "big"
        )
        g = torch.Generator().manual_seed(seed)
        return torch.randn(*self.latent_shape, generator=g)

    @torch.no_grad()
    def __call__(self, prompts: list[Prompt]) -> torch.Tensor:
        dtype = self.backbone.pipeline_dtype(self.pipe)
        latents = torch.stack([self.noise(p) for p in prompts]).to(self.device, dtype)
        texts = [p.text for p in prompts]
        if self.steps is None:
            images = self.backbone.sample_one_step(self.pipe, texts, latents, self.config.t_star)
        else:
            images = self.backbone.sample_steps(self.pipe, texts, latents, self.steps, self.config.guidance_scale)
        return images.float().clamp(0, 1)


def _recorded_backbone(root: Path) -> str:
    """The backbone an exported pipeline records in its distar.json; a pipeline without one (a reference, or an
    export from before the choice) is the default's."""
    meta = root / "distar.json"
    if meta.is_file():
        try:
            name = json.loads(meta.read_text()).get("backbone", backbones.DEFAULT)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
            raise UserError(f"{meta} is not valid JSON ({err}); export the model again") from None
        if name not in backbones.NAMES:
            raise UserError(f"{meta} names backbone {name!r}, which this distar does not know ({backbones.NAMES})")
        return name
    return backbones.DEFAULT


def _load_metrics(config: EvaluateConfig, device):
    from distar.rewards import RewardSpec, load_reward

    models = {}
    for name in config.rewards:
        spec = RewardSpec(name, 1.0, config.sources.get(name), head=config.heads.get(name))
        models[name] = load_reward(spec, cache_dir=config.cache_dir).to(device).eval()
    return models


def _evaluate_one(spec: str, role: str, prompts, metrics, config, device, out_fs, out_path) -> dict:
    """Generate and score every prompt not yet done for this model; returns the run's bookkeeping."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    work = f"{out_path}/work/{role}"
    out_fs.makedirs(work, exist_ok=True)
    done = set()
    for f in out_fs.glob(f"{work}/scores-*.parquet"):
        with out_fs.open(f, "rb") as fh:
            done.update(pq.read_table(fh, columns=["id"]).column("id").to_pylist())
    todo = [p for p in prompts if p.id not in done]
    generated, seconds = 0, 0.0
    sampler = Sampler(spec, config, device) if todo else None
    for start in range(0, len(todo), config.batch_size):
        batch = todo[start : start + config.batch_size]
        began = time.perf_counter()
        images = sampler(batch)
        seconds += time.perf_counter() - began
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
        # one shard per finished batch, named by its first prompt: a crash loses at most the batch in flight
        out_fs.pipe_file(f"{work}/scores-{batch[0].id}.parquet", buf.getvalue())
        generated += len(batch)
    return {"generated": generated, "skipped": len(done), "generation_seconds": seconds}


def _read_scores(out_fs, out_path, role):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for f in sorted(out_fs.glob(f"{out_path}/work/{role}/scores-*.parquet")):
        with out_fs.open(f, "rb") as fh:
            tables.append(pq.read_table(fh))
    return pa.concat_tables(tables, promote_options="default")


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


def prompt_digest(prompts: list[Prompt]) -> str:
    return hashlib.sha256(json.dumps([[p.group, p.id, p.text] for p in prompts]).encode()).hexdigest()


def protocol(config: EvaluateConfig, prompts: list[Prompt]) -> dict:
    """What the numbers depend on besides the model. `image_size` is added once images exist."""
    from distar.rewards import DEFAULTS

    sets = {}
    for name, source in (("parti", config.prompts), ("hps", config.hps_prompts)):
        chosen = [p for p in prompts if p.set == name]
        if chosen:
            sets[name] = {"source": source, "count": len(chosen), "sha256": prompt_digest(chosen)}
    rewards = {}
    for name in config.rewards:
        rewards[name] = sources.provenance(config.sources.get(name) or DEFAULTS[name][0], config.cache_dir)
        if config.heads.get(name):
            rewards[name]["head"] = config.heads[name]
    return {
        "prompts": sets,
        "max_prompts": config.max_prompts,
        "seed": config.seed,
        "noise": "one N(0, I) latent per prompt, seeded by blake2b(seed/prompt id)",
        "images_per_prompt": 1,
        "t_star": config.t_star,
        "reference_guidance_scale": config.guidance_scale,
        "rewards": rewards,
        "precision": str(sources.parse_dtype(config.dtype)).removeprefix("torch."),
    }


def protocol_digest(proto: dict) -> str:
    return hashlib.sha256(json.dumps(proto, sort_keys=True).encode()).hexdigest()[:16]


def protocol_difference(a: dict, b: dict, where: str = "") -> str | None:
    """The first field (dotted path) whose value differs between two protocols; None when they agree."""
    for key in sorted(set(a) | set(b)):
        path = f"{where}.{key}" if where else key
        if key not in a or key not in b:
            return path
        if isinstance(a[key], dict) and isinstance(b[key], dict):
            found = protocol_difference(a[key], b[key], path)
            if found:
                return found
        elif a[key] != b[key]:
            return path
    return None


def _field(proto: dict, path: str):
    for part in path.split("."):
        proto = proto.get(part, "(absent)") if isinstance(proto, dict) else "(absent)"
    return proto


def check_same_protocol(mine: dict, theirs: dict, what: str, allow: bool = False) -> str | None:
    """A UserError naming the first differing field, unless `allow` (then the field is returned)."""
    diff = protocol_difference(mine, theirs)
    if diff and not allow:
        raise UserError(
            f"{what} was evaluated under another protocol: {diff} is {_field(theirs, diff)!r} there and "
            f"{_field(mine, diff)!r} here. Evaluate both under one protocol, or pass --allow-protocol-mismatch"
        )
    return diff


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
    prompts, proto = read if read is not None else _read_protocol(config)
    compared = load_metrics(config.compare_to) if config.compare_to else None
    if compared is not None:  # before any image is generated: a mismatch costs nothing
        theirs = {k: v for k, v in compared.get("protocol", {}).items() if k != "image_size"}
        check_same_protocol(proto, theirs, f"--compare-to {config.compare_to!r}", config.allow_protocol_mismatch)
    metrics = _load_metrics(config, device)
    out_fs, out_path = storage.filesystem(config.out)
    out_path = out_path.rstrip("/")
    runs = {"model": _evaluate_one(config.model, "model", prompts, metrics, config, device, out_fs, out_path)}
    if config.baseline:
        runs["baseline"] = _evaluate_one(
            config.baseline, "baseline", prompts, metrics, config, device, out_fs, out_path
        )
    results, tables = {}, {}
    for role in runs:
        tables[role] = _read_scores(out_fs, out_path, role)
        results[role] = summarise(tables[role], config.rewards)
        buf = io.BytesIO()
        pq.write_table(tables[role], buf)
        out_fs.pipe_file(f"{out_path}/{'scores' if role == 'model' else 'baseline_scores'}.parquet", buf.getvalue())
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
        "paper": PAPER,
        "protocol": proto,
        "protocol_digest": protocol_digest(proto),
        "config": asdict(config),
        "prompts": len(prompts),
    }
    storage.write_json(out_fs, f"{out_path}/metrics.json", report)
    out_fs.pipe_file(f"{out_path}/report.html", render_report(report, tables, out_fs, out_path).encode())
    return report


def _histogram_png(values_by_role: dict[str, list[float]], name: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(4.8, 3.0), dpi=100)
    for role, values in values_by_role.items():
        ax.hist(values, bins=20, alpha=0.6, label=role)
    ax.set_title(name, fontsize=10)
    ax.set_xlabel("score (paper scale)", fontsize=8)
    ax.set_ylabel("images", fontsize=8)
    # Few, small ticks: the default locator puts long float labels edge to edge on a 4-inch axis.
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
    ax.yaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def render_report(report: dict, tables: dict, out_fs, out_path: str) -> str:
    import math

    e = html.escape
    res = report["results"]
    names = [n for n in ("imagereward", "aesthetic", "pickscore", "clip", "hpsv2.1") if n in res["model"]]
    head = "".join(f"<th>{e(n)}</th>" for n in names) + "<th>s / image</th>"
    rows = []
    compared = (report.get("compared_to") or {}).get("model")
    for role, label in (("model", report["model"]), ("baseline", report["baseline"]), ("compared", compared)):
        if role in res:
            cells = "".join(f"<td>{res[role].get(n, float('nan')):.4g}</td>" for n in names)
            rows.append(
                f"<tr><td>{e(role)}: {e(str(label))}</td>{cells}<td>{res[role]['seconds_per_image']:.3g}</td></tr>"
            )
    for label, values in report["paper"].items():
        cells = "".join(f"<td>{values.get(n, float('nan')):.4g}</td>" for n in names)
        rows.append(f"<tr class='paper'><td>paper: {e(label)}</td>{cells}<td></td></tr>")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>distar evaluation</title><style>"
        "body{font-family:sans-serif;margin:2em}td,th{padding:4px 8px;border-bottom:1px solid #ddd}"
        ".paper{color:#666}img{margin:2px}</style></head><body>",
        f"<h1>distar evaluation</h1><p>{report['prompts']} prompts; model <code>{e(report['model'])}</code></p>",
        f"<h2>Protocol</h2><p>digest <code>{e(report['protocol_digest'])}</code></p>"
        f"<pre id='protocol'>{e(json.dumps(report['protocol'], indent=1))}</pre>",
        f"<h2>Metrics</h2><table id='metrics'><tr><th>model</th>{head}</tr>{''.join(rows)}</table>",
        "<h2>Score histograms</h2>",
    ]
    model_rows = tables["model"].to_pylist()
    for n in names:
        by_role = {role: [r[n] for r in t.to_pylist() if not math.isnan(r[n])] for role, t in tables.items()}
        parts.append(f"<img alt='{e(n)} histogram' src='data:image/png;base64,{_histogram_png(by_role, n)}'>")
    parts.append("<h2>Images by category</h2>")
    groups: dict[str, list] = {}
    for r in model_rows:
        groups.setdefault(f"{r['set']} / {r['group']}", []).append(r)
    for group, items in sorted(groups.items()):
        imgs = "".join(
            f"<a href='{e(r['image'])}'><img src='{_thumbnail(out_fs, out_path + '/' + r['image'])}' width='128' "
            f"title='{e(r['prompt'])}'></a>"
            for r in items[:8]
        )
        parts.append(f"<h3>{e(group)}</h3><div class='grid'>{imgs}</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _thumbnail(fs, path: str, side: int = 128) -> str:
    """A small JPEG as a data URI: the report stays one self-contained file (the pipeline UI shows it alone)."""
    from PIL import Image

    with fs.open(path, "rb") as fh:
        image = Image.open(fh).convert("RGB")
        image.thumbnail((side, side))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def load_metrics(path: str | Path) -> dict:
    """A metrics.json, given as the file or the evaluation directory that holds it."""
    path = str(path) if str(path).endswith(".json") else f"{str(path).rstrip('/')}/metrics.json"
    fs, p = storage.filesystem(path)
    if not fs.exists(p):
        raise UserError(f"{path!r}: no metrics.json there (an output of distar evaluate)")
    return json.loads(fs.cat_file(p))


def _read_protocol(config: EvaluateConfig) -> tuple[list[Prompt], dict]:
    prompts = load_prompts(config)
    return prompts, protocol(config, prompts)


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
    from dataclasses import replace

    tiny_preset.prepare(asdict(config))
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
