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
        parts.append(f"<img alt='{e(n)} histogram' src='data:image/png;base64,{histogram_png(by_role, n)}'>")
    parts.append("<h2>Images by category</h2>")
    groups: dict[str, list] = {}
    for r in model_rows:
        groups.setdefault(f"{r['set']} / {r['group']}", []).append(r)
    for group, items in sorted(groups.items()):
        # no links: the pipeline UI shows the report alone in a sandboxed iframe, where a relative link leads nowhere;
        # the full-size image's path under the results is in the tooltip
        imgs = "".join(
            f"<img src='{thumbnail(out_fs, out_path + '/' + r['image'])}' width='128' "
            f"title='{e(r['prompt'])} ({e(r['image'])})'>"
            for r in items[:8]
        )
        parts.append(f"<h3>{e(group)}</h3><div class='grid'>{imgs}</div>")
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
