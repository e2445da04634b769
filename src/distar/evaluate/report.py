"""The evaluation's HTML report, one self-contained file (images as data URIs: the pipeline UI shows it alone), and
the image helpers the ablation's comparison shares."""

from __future__ import annotations

import base64
import html
import io
import json


def histogram_png(values_by_role: dict[str, list[float]], name: str) -> str:
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
    encoded = png_base64(fig)
    plt.close(fig)
    return encoded


def png_base64(fig) -> str:
    """A matplotlib figure as base64 PNG, for a data URI."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode()


def signed(delta: float | None, like: float | None = None) -> str:
    """A difference with the decimals of the value it changes (4 significant digits of `like`): +0.0012, not
    +1.23e-03; a difference below that precision prints as ±0."""
    import math

    if delta is None or math.isnan(delta):
        return "—"
    scale = abs(like) if like not in (None, 0) and not math.isnan(like) else abs(delta) or 1.0
    places = max(0, 3 - math.floor(math.log10(scale)))
    text = f"{delta:+.{places}f}"
    return "±0" if float(text) == 0 else text


def model_label(spec: str | None, guidance_scale: float | None = None) -> str:
    """How a report names a model: `reference:N` with its real step count, `unet:SOURCE` as the initial
    generator, else the path."""
    if not spec:
        return ""
    if spec.startswith("reference:"):
        cfg = f", CFG {guidance_scale:g}" if guidance_scale else ""
        return f"reference sampled in {spec.split(':', 1)[1]} steps{cfg}"
    if spec.startswith("unet:"):
        return f"initial generator {spec.removeprefix('unet:')}"
    return spec


def _spread(table, name: str) -> float | None:
    import math
    import statistics

    values = [v for v in table.column(name).to_pylist() if v is not None and not math.isnan(v)]
    return statistics.stdev(values) if len(values) > 1 else None


def _paper_row_of_baseline(spec: str | None) -> str | None:
    if not spec:
        return None
    if spec.startswith("reference:"):
        return "SDXL (50 steps)"
    return "DMD2 (start point)" if spec.startswith("unet:") else None


def render_report(report: dict, tables: dict, out_fs, out_path: str) -> str:
    """The page leads with what the reader came for: the metrics table (model, its EMA, baseline, Δ, the spread over
    images, the paper's values), then one line of protocol, the model's and the baseline's images side by side
    with their prompts, the score histograms, and the full protocol folded at the end."""
    import math

    from distar.sources import runs_on_tiny

    e = html.escape
    res = report["results"]
    names = [n for n in ("imagereward", "aesthetic", "pickscore", "clip", "hpsv2.1") if n in res["model"]]
    proto = report["protocol"]
    guidance = proto.get("reference_guidance_scale")
    baseline = report.get("baseline")
    compared = (report.get("compared_to") or {}).get("model")
    paper_base = _paper_row_of_baseline(baseline)
    head = ["metric", "model"]
    if "ema" in res:
        head += ["EMA weights", "Δ vs EMA"]
    if "baseline" in res:
        head += ["baseline", "Δ vs baseline"]
    if "compared" in res:
        head += ["compared", "Δ vs compared"]
    head += ["sd over images", "paper: DI*"] + ([f"paper: {paper_base}"] if paper_base else [])
    rows = []
    for n in names + ["seconds_per_image"]:
        ours = res["model"].get(n, float("nan"))
        cells = ["s / image" if n == "seconds_per_image" else n, f"{ours:.4g}"]
        for role in ("ema", "baseline", "compared"):
            if role in res:
                theirs = res[role].get(n, float("nan"))
                cells += [f"{theirs:.4g}", signed(ours - theirs, ours)]
        spread = _spread(tables["model"], n) if n != "seconds_per_image" else None
        cells.append("" if spread is None else f"±{spread:.2g}")
        cells.append(f"{report['paper']['DI*'][n]:.4g}" if n in report["paper"]["DI*"] else "")
        if paper_base:
            cells.append(f"{report['paper'][paper_base][n]:.4g}" if n in report["paper"][paper_base] else "")
        rows.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>")
    title = report.get("label") or "/".join(str(report["model"]).rstrip("/").split("/")[-2:])
    who = f"model <code>{e(model_label(report['model']))}</code>"
    if baseline:
        who += f" against baseline <code>{e(model_label(baseline, guidance))}</code>"
    if compared:
        who += f"; compared with <code>{e(str(compared))}</code>"
    protocol_line = (
        f"{report['prompts']} prompts, {proto.get('images_per_prompt', 1)} image each, seed {proto.get('seed')}, "
        f"t* {proto.get('t_star')}, {proto.get('precision', report.get('config', {}).get('dtype', ''))}, "
        f"{proto.get('image_size')} px; protocol {report['protocol_digest']} (in full at the end)"
    )
    warn = ""
    config = report.get("config") or {}
    if runs_on_tiny({"protocol": proto, "config": config}, config.get("cache_dir")):
        warn = (
            "<p class='warn'>Tiny preset: random tiny models and rewards. These numbers show that evaluation "
            "works end to end; they say nothing about image quality.</p>"
        )
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>distar evaluation</title><style>"
        "body{font-family:sans-serif;margin:1em;max-width:1100px}h1{font-size:1.5em}"
        "td,th{padding:3px 5px;border-bottom:1px solid #ddd;text-align:right;font-size:13px}"
        "td:first-child,th:first-child{text-align:left}th{font-size:12px}"
        ".scroll{overflow-x:auto;max-width:100%}.warn{background:#fff4d6;border-left:4px solid #e0a000;"
        "padding:4px 8px}.pair{display:inline-block;vertical-align:top;margin:0 10px 10px 0;width:262px}"
        ".pair img{margin:1px}figcaption{font-size:12px;color:#333}.who{color:#444;font-size:13px}"
        "img{max-width:100%}</style></head><body>",
        f"<h1>distar evaluation: {e(title)}</h1>{warn}",
        f"<div class='scroll'><table id='metrics'><tr>{''.join(f'<th>{e(h)}</th>' for h in head)}</tr>"
        f"{''.join(rows)}</table></div>",
        f"<p class='who'>{who}.<br>{e(protocol_line)}</p>",
    ]
    model_rows = tables["model"].to_pylist()
    with_baseline = "baseline" in tables
    parts.append(
        "<h2>Images: model | baseline, same prompt and noise</h2>" if with_baseline else "<h2>Images by category</h2>"
    )
    groups: dict[str, list] = {}
    for r in model_rows:
        groups.setdefault(f"{r['set']} / {r['group']}", []).append(r)
    for group, items in sorted(groups.items()):
        # no links: the pipeline UI shows the report alone in a sandboxed iframe, where a relative link leads nowhere;
        # the full-size image's path under the results is in the tooltip
        figures = []
        for r in items[:4]:
            imgs = [thumbnail(out_fs, f"{out_path}/{r['image']}")]
            other = f"{out_path}/images/baseline/{r['id']}.png"
            if with_baseline and out_fs.exists(other):
                imgs.append(thumbnail(out_fs, other))
            pictures = "".join(f"<img src='{src}' width='128' title='{e(r['image'])}'>" for src in imgs)
            figures.append(f"<figure class='pair'>{pictures}<figcaption>{e(r['prompt'])}</figcaption></figure>")
        parts.append(f"<h3>{e(group)}</h3><div class='grid'>{''.join(figures)}</div>")
    parts.append("<h2>Score histograms</h2>")
    for n in names:
        by_role = {role: [r[n] for r in t.to_pylist() if not math.isnan(r[n])] for role, t in tables.items()}
        parts.append(f"<img alt='{e(n)} histogram' src='data:image/png;base64,{histogram_png(by_role, n)}'>")
    parts.append(
        "<h2>Protocol</h2><details><summary>the full protocol (prompt sets, reward models and their files)"
        f"</summary><pre id='protocol'>{e(json.dumps(proto, indent=1))}</pre></details>"
    )
    parts.append("</body></html>")
    return "\n".join(parts)


def thumbnail(fs, path: str, side: int = 128) -> str:
    """A small JPEG as a data URI: the report stays one self-contained file (the pipeline UI shows it alone)."""
    from PIL import Image

    with fs.open(path, "rb") as fh:
        image = Image.open(fh).convert("RGB")
        image.thumbnail((side, side))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
