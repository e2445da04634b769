"""The training report: {out}/report.html, self-contained, from logs/metrics.jsonl, config.json and the sample grids.

A header with what the run is (preset, config digest, steps, wall time, throughput), then one panel per quantity,
each with its unit on the y axis and a sentence on what a healthy run shows (docs/TRAINING.md has the longer
reading), every guardrail metric with its threshold when guards are set, the sample grids over the run (up to
MAX_GRIDS, evenly spaced) and the resolved config, folded. Written by rank 0 at the end of a run, a preemption or a
guard stop.
"""

from __future__ import annotations

import base64
import html
import io
import json
import statistics

from distar import storage
from distar.sources import runs_on_tiny


class Panel:
    def __init__(self, title: str, series: list[str], unit: str, healthy: str, log: bool = False):
        self.title, self.series, self.unit, self.healthy, self.log = title, series, unit, healthy, log


PANELS = [
    Panel(
        "reward",
        ["reward", "eval/reward"],
        "reward (paper scale)",
        "Rises over the run and then flattens. eval/reward is the fixed sample grid's score: if it falls while the "
        "training reward rises, the generator fits the batches, not the reward.",
    ),
    Panel(
        "divergence",
        ["divergence"],
        "pseudo-Huber score divergence",
        "Starts near the initial generator's distance from the reference and stays bounded; steady growth with "
        "the reward flat means α_rew is too large for the divergence to hold the generator.",
    ),
    Panel(
        "generator losses",
        ["loss/generator", "loss/divergence", "loss/reward"],
        "loss (surrogate)",
        "Surrogate losses: their gradients, not their values, are the method's. loss/reward is −α_rew · reward, so "
        "it falls as the reward rises; loss/generator is the sum.",
    ),
    Panel(
        "assistant loss",
        ["loss/assistant"],
        "denoising loss",
        "The assistant's denoising loss on the generator's samples: it stays at the same level while it tracks "
        "the generator. A steady climb means it lags: more assistant updates per generator update (K_TA).",
    ),
    Panel(
        "balance",
        ["balance/reward_to_divergence"],
        "reward pull / divergence pull",
        "The reward's gradient on x0 over the divergence's (RMS). Around 1 they pull equally; far above 1 the "
        "reward dominates and the images drift from the reference.",
        log=True,
    ),
    Panel(
        "gradient norms",
        ["grad_norm/generator", "grad_norm/assistant"],
        "gradient norm (before clipping)",
        "Level or slowly falling. Spikes of orders of magnitude come before non-finite steps (counted as skipped).",
        log=True,
    ),
    Panel(
        "learning rate",
        ["lr/generator", "lr/assistant"],
        "learning rate",
        "The schedule as configured: the warm-up ramp, then constant.",
    ),
    Panel(
        "throughput",
        ["images_per_s"],
        "images / s (all ranks)",
        "Flat after the first steps (compilation and warm-up); dips mark checkpoint and sample steps.",
    ),
]

MAX_GRIDS = 6


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode()


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours} h {minutes:02d} min" if hours else (f"{minutes} min {secs:02d} s" if minutes else f"{secs} s")


def header(lines: list[dict], config: dict | None) -> list[str]:
    """The facts the header states, each a short phrase: preset, config digest, steps, wall time, throughput."""
    from distar.train.config import config_digest

    facts = []
    if config:
        digest = config_digest(config)
        tiny = runs_on_tiny(config, config["model"].get("cache_dir"))
        preset = "tiny preset (random tiny models)" if tiny else "models: " + str(config["model"]["reference"])
        facts += [preset, f"config {digest}"]
    steps = [line["step"] for line in lines if "loss/generator" in line]
    planned = (config or {}).get("steps")
    if steps:
        facts.append(f"step {max(steps)}" + (f" of {planned}" if planned else ""))
    times = [line["time"] for line in lines if isinstance(line.get("time"), (int, float))]
    if len(times) > 1:
        facts.append(f"{_duration(max(times) - min(times))} from the first log line to the last")
    rates = [line["images_per_s"] for line in lines if isinstance(line.get("images_per_s"), (int, float))]
    if rates:
        facts.append(f"{statistics.median(rates):.3g} images/s (median)")
    return facts


def render(out: str, guard=None, baseline: dict | None = None) -> str:
    """Write {out}/report.html; returns its path. `guard` (GuardConfig) and `baseline` draw the thresholds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    e = html.escape
    fs, path = storage.filesystem(out)
    root = path.rstrip("/")
    lines = []
    if fs.exists(f"{root}/logs/metrics.jsonl"):
        lines = [json.loads(line) for line in fs.cat_file(f"{root}/logs/metrics.jsonl").decode().splitlines() if line]
    config = json.loads(fs.cat_file(f"{root}/config.json")) if fs.exists(f"{root}/config.json") else None
    keys = sorted({k for line in lines for k in line if k.startswith("guard/") and k != "guard/breached"})
    guard_panels = [
        Panel(k, [k], "guard metric", "Stays on the right side of the red threshold; a crossing is a breach.")
        for k in keys
    ]
    figures = []
    for panel in PANELS + guard_panels:
        present = [k for k in panel.series if any(isinstance(line.get(k), (int, float)) for line in lines)]
        if not present:
            continue
        fig, ax = plt.subplots(figsize=(5.2, 2.8), dpi=100)
        for key in present:
            points = [(line["step"], line[key]) for line in lines if isinstance(line.get(key), (int, float))]
            ax.plot(*zip(*points, strict=True), marker="." if len(points) < 30 else None, label=key)
        threshold = _threshold(panel.title, guard, baseline)
        if threshold is not None:
            ax.axhline(threshold, color="red", linestyle="--", label="guard threshold")
        if panel.log and all(line.get(k, 1) > 0 for line in lines for k in present if isinstance(line.get(k), float)):
            ax.set_yscale("log")
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("training step", fontsize=8)
        ax.set_ylabel(panel.unit, fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
        figures.append(
            f"<figure class='panel'><img alt='{e(panel.title)}' src='data:image/png;base64,{_png(fig)}'>"
            f"<figcaption>{e(panel.healthy)}</figcaption></figure>"
        )
        plt.close(fig)
    grids = sorted(fs.glob(f"{root}/samples/step_*.png"))
    sample = ""
    if grids:  # the grids over the run (fixed prompts and noise): the first, the last, evenly spaced between
        chosen = sorted({grids[round(i * (len(grids) - 1) / (MAX_GRIDS - 1))] for i in range(MAX_GRIDS)})
        shown = []
        for grid in chosen:
            data = base64.b64encode(fs.cat_file(grid)).decode()
            step = int(grid.rsplit("_", 1)[-1].removesuffix(".png"))
            shown.append(
                f"<figure><img alt='samples at step {step}' src='data:image/png;base64,{data}'>"
                f"<figcaption>step {step}</figcaption></figure>"
            )
        sample = (
            f"<h2>Samples over the run</h2><p>The same prompts and noise at {len(chosen)} of {len(grids)} sample "
            "steps.</p>" + "".join(shown)
        )
    breached = [line["step"] for line in lines if line.get("guard/breached")]
    facts = header(lines, config)
    warning = ""
    if config and runs_on_tiny(config, config["model"].get("cache_dir")):
        warning = (
            "<p class='warn'>The tiny preset trains random tiny models for a few steps: these curves show that the "
            "run works, not what a real run's curves look like.</p>"
        )
    folded = (
        f"<details><summary>resolved config</summary><pre>{e(json.dumps(config, indent=1))}</pre></details>"
        if config
        else ""
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>distar training report</title><style>"
        "body{font-family:sans-serif;margin:1em;max-width:1100px}.facts{color:#333}"
        ".warn{background:#fff4d6;border-left:4px solid #e0a000;padding:4px 8px}"
        ".panel{display:inline-block;vertical-align:top;width:520px;max-width:100%;margin:0 8px 12px 0}"
        "figure{margin:0 8px 12px 0}img{max-width:100%}figcaption{font-size:12px;color:#444}"
        "</style></head><body>"
        f"<h1>distar training report</h1><p class='facts' id='facts'>{e(' · '.join(facts))}</p>{warning}"
        + (f"<p class='warn'>guard breached at steps {breached}</p>" if breached else "")
        + f"<div id='panels'>{''.join(figures)}</div>{sample}{folded}<p class='facts'>{e(out)}</p></body></html>"
    )
    fs.pipe_file(f"{root}/report.html", page.encode())
    return f"{root}/report.html"


def _threshold(key: str, guard, baseline: dict | None) -> float | None:
    if guard is None or not baseline or key not in baseline:
        return None
    if key == "guard/diversity" and guard.min_diversity > 0:
        return guard.min_diversity * baseline[key]
    name = key.removeprefix("guard/heldout/")
    if key.startswith("guard/heldout/") and name in guard.max_heldout_drop:
        return baseline[key] - guard.max_heldout_drop[name]
    return None
