"""The training report: {out}/report.html, self-contained, from logs/metrics.jsonl and the sample grids.

Curves of the losses, the reward and the divergence, the reward/divergence balance, and every guardrail metric with
its threshold when guards are set (docs/TRAINING.md), then the sample grids over the run (up to MAX_GRIDS, evenly
spaced). Written by rank 0 at the end of a run, a preemption or a guard stop.
"""

from __future__ import annotations

import base64
import html
import io
import json

from distar import storage

PANELS = [
    ("losses", ["loss/generator", "loss/divergence", "loss/reward", "loss/assistant"]),
    ("reward (paper scale) and divergence", ["reward", "divergence", "eval/reward"]),
    ("balance: reward pull / divergence pull on x0", ["balance/reward_to_divergence"]),
]


MAX_GRIDS = 6


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode()


def render(out: str, guard=None, baseline: dict | None = None) -> str:
    """Write {out}/report.html; returns its path. `guard` (GuardConfig) and `baseline` draw the thresholds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fs, path = storage.filesystem(out)
    root = path.rstrip("/")
    lines = []
    if fs.exists(f"{root}/logs/metrics.jsonl"):
        lines = [json.loads(line) for line in fs.cat_file(f"{root}/logs/metrics.jsonl").decode().splitlines() if line]
    keys = sorted({k for line in lines for k in line if k.startswith("guard/") and k != "guard/breached"})
    panels = PANELS + [(k, [k]) for k in keys]
    figures = []
    for title, series in panels:
        present = [k for k in series if any(isinstance(line.get(k), (int, float)) for line in lines)]
        if not present:
            continue
        fig, ax = plt.subplots(figsize=(5.2, 3.0), dpi=100)
        for key in present:
            points = [(line["step"], line[key]) for line in lines if isinstance(line.get(key), (int, float))]
            ax.plot(*zip(*points, strict=True), marker="." if len(points) < 30 else None, label=key)
        threshold = _threshold(title, guard, baseline)
        if threshold is not None:
            ax.axhline(threshold, color="red", linestyle="--", label="guard threshold")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
        figures.append(_png(fig))
        plt.close(fig)
    grids = sorted(fs.glob(f"{root}/samples/step_*.png"))
    sample = ""
    if grids:  # the grids over the run (fixed prompts and noise): the first, the last, evenly spaced between
        chosen = sorted({grids[round(i * (len(grids) - 1) / (MAX_GRIDS - 1))] for i in range(MAX_GRIDS)})
        shown = []
        for grid in chosen:
            data = base64.b64encode(fs.cat_file(grid)).decode()
            name = html.escape(grid.rsplit("/", 1)[-1].removesuffix(".png"))
            shown.append(f"<figure><img src='data:image/png;base64,{data}'><figcaption>{name}</figcaption></figure>")
        sample = f"<h2>Samples over the run ({len(chosen)} of {len(grids)} grids)</h2>" + "".join(shown)
    breached = [line["step"] for line in lines if line.get("guard/breached")]
    body = "".join(f"<img src='data:image/png;base64,{f}'>" for f in figures)
    page = (
        "<html><head><meta charset='utf-8'><title>distar training report</title></head><body>"
        f"<h1>distar training report</h1><p>{html.escape(out)}: {len(lines)} log lines"
        + (f"; guard breached at steps {breached}" if breached else "")
        + f"</p>{body}{sample}</body></html>"
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
