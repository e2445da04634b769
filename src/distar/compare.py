"""The paper's ablation, compared: every variant's evaluation under one pinned protocol, beside the paper's value
and the initial generator's, with the same prompts' images side by side and each variant's training curves.

`TABLE3` is the default grid of `pipelines/distar_ablation.py`: the rows of the paper's ablation table, each
with the paper's numbers (`evaluate.PAPER_ABLATION`, docs/METHOD.md §8): KL (DI++) and the score divergence
(DI*) at (α_rew, α_cfg) = (0, 0) and (0, 7.5), DI++ and DI*-OUT at (100, 7.5), DI*-IN at α_rew 1, 10, 100 with
α_cfg 7.5 and at (100, 4.5).
"""

from __future__ import annotations

import html
import json
import math

from distar import storage
from distar.errors import UserError
from distar.evaluate import ABLATION_SOURCE, PAPER, PAPER_ABLATION, check_same_protocol, load_metrics
from distar.evaluate.report import model_label, png_base64, signed, thumbnail
from distar.sources import runs_on_tiny

METRICS = ("imagereward", "aesthetic", "pickscore", "clip", "hpsv2.1")
CURVES = ("reward", "divergence", "balance/reward_to_divergence")


def _variant(name: str, divergence: str, alpha_rew: float, alpha_cfg: float, cfg: str, paper: str | None) -> dict:
    overrides = [
        f"loss.divergence={divergence}",
        f"loss.alpha_rew={alpha_rew:g}",
        f"loss.alpha_cfg={alpha_cfg:g}",
        f"loss.cfg={cfg}",
    ]
    return {
        "name": name,
        "overrides": overrides,
        "paper": paper or "",
        "settings": {"divergence": divergence, "alpha_rew": alpha_rew, "alpha_cfg": alpha_cfg, "cfg": cfg},
    }


TABLE3 = [
    _variant("kl-cfg0", "kl", 0, 0, "divergence", "DI++ (KL) (0, 0)"),
    _variant("kl-cfg", "kl", 0, 7.5, "divergence", "DI++ (KL) (0, 7.5) = Diff-Instruct"),
    _variant("kl-rew100", "kl", 100, 7.5, "divergence", "DI++ (KL) (100, 7.5)"),
    _variant("score-rew100-cfg-out", "score", 100, 7.5, "reward", "DI*-OUT (100, 7.5)"),
    _variant("score-cfg0", "score", 0, 0, "divergence", "DI*-IN (0, 0)"),
    _variant("score-cfg", "score", 0, 7.5, "divergence", "DI*-IN (0, 7.5) = SIM"),
    _variant("score-rew1", "score", 1, 7.5, "divergence", "DI*-IN (1, 7.5)"),
    _variant("score-rew10", "score", 10, 7.5, "divergence", "DI*-IN (10, 7.5)"),
    _variant("score-rew100-cfg4.5", "score", 100, 4.5, "divergence", "DI*-IN (100, 4.5)"),
    _variant("score-rew100", "score", 100, 7.5, "divergence", "DI*-IN (100, 7.5)"),
]
"""The variants of the sweep: name, config overrides, and the row of the paper's ablation table each one is."""
INITIAL_ROW = "DMD2 init"
"""The ablation table's row of the initial generator."""
PAPER_ROWS = PAPER_ABLATION | PAPER
"""Every row of the paper distar restates: the ablation table's, then the main table's (evaluate.PAPER)."""


def paper_source(label: str) -> str:
    if label in PAPER_ABLATION:
        return ABLATION_SOURCE
    return "the paper's main results table" if label in PAPER else ""


def _metrics(reports: list[dict]) -> list[str]:
    """The paper's metrics the evaluations hold, in the paper's order; where they hold none of them (the lab's
    judge metrics), every number they hold."""
    found = {m for r in reports for m, v in r["results"]["model"].items() if isinstance(v, (int, float))}
    return [m for m in METRICS if m in found] or sorted(found)


def _curves(run: str | None) -> list[dict]:
    if not run:
        return []
    fs, path = storage.filesystem(run)
    log = f"{path.rstrip('/')}/logs/metrics.jsonl"
    if not fs.exists(log):
        return []
    return [json.loads(line) for line in fs.cat_file(log).decode().splitlines() if line.strip()]


def _breached(lines: list[dict]) -> list[int]:
    return [int(line["step"]) for line in lines if line.get("guard/breached")]


def compare(
    evaluations: list[str],
    out: str,
    initial: str | None = None,
    reference: str | None = None,
    paper: dict[str, str] | None = None,
    allow_protocol_mismatch: bool = False,
    images: int = 4,
) -> dict:
    """Compare evaluations (metrics.json files or their directories, each labelled by its variant) under one
    protocol; `initial` and `reference` are the baselines' evaluations. Writes {out}/comparison.json,
    {out}/comparison.md and {out}/report.html (self-contained); returns the comparison."""
    if not evaluations:
        raise UserError("distar compare: no evaluations to compare")
    paper = {v["name"]: v["paper"] for v in TABLE3} | (paper or {})
    unknown = sorted({label for label in paper.values() if label and label not in PAPER_ROWS})
    if unknown:
        raise UserError(f"distar compare: {unknown} are not rows of the paper; known rows: {', '.join(PAPER_ROWS)}")
    loaded = {}
    for uri in evaluations:
        report = load_metrics(uri)
        name = report.get("label") or report["model"]
        if name in loaded:
            raise UserError(f"distar compare: two evaluations are labelled {name!r} ({uri})")
        loaded[name] = (str(uri), report)
    baselines = {}
    for role, uri in (("initial", initial), ("reference", reference)):
        if uri:
            baselines[role] = (str(uri), load_metrics(uri))
    # the paper's tables are SDXL's: beside another family's numbers they would read as a like-for-like comparison
    families = sorted({r.get("backbone", "sdxl") for _, r in [*loaded.values(), *baselines.values()]})
    if families != ["sdxl"]:
        paper = {}
    first_name, (_, first) = next(iter(loaded.items()))
    mismatches = {}
    for name, (_, report) in list(loaded.items())[1:] + list(baselines.items()):
        what = f"{name!r} (against {first_name!r})"
        found = check_same_protocol(first["protocol"], report["protocol"], what, allow_protocol_mismatch)
        if found:
            mismatches[name] = found
    start = baselines["initial"][1]["results"]["model"] if "initial" in baselines else {}
    metrics = _metrics([report for _, report in loaded.values()])
    rows = []
    for name, (uri, report) in loaded.items():
        ours = report["results"]["model"]
        lines = _curves(report.get("run"))
        label = paper.get(name) or ""
        rows.append(
            {
                "variant": name,
                "evaluation": uri,
                "run": report.get("run"),
                "ours": {m: ours[m] for m in metrics if m in ours},
                "paper_row": label,
                "paper": PAPER_ROWS.get(label, {}),
                "paper_source": paper_source(label),
                "vs_initial": {m: ours[m] - start[m] for m in metrics if m in ours and m in start},
                "guard_breached_at": _breached(lines),
                "curves": {
                    k: [(line["step"], line[k]) for line in lines if isinstance(line.get(k), (int, float))]
                    for k in CURVES
                    + tuple(
                        sorted({k for line in lines for k in line if k.startswith("guard/") and k != "guard/breached"})
                    )
                },
            }
        )
    result = {
        "metrics": metrics,
        "protocol": first["protocol"],
        "protocol_digest": first.get("protocol_digest"),
        "protocol_mismatches": mismatches,
        "rows": rows,
        "baselines": {
            role: {"evaluation": uri, "model": r["model"], "ours": r["results"]["model"]}
            for role, (uri, r) in baselines.items()
        },
        "backbones": families,
        "paper_baselines": {INITIAL_ROW: PAPER_ABLATION[INITIAL_ROW], "SDXL (50 steps)": PAPER["SDXL (50 steps)"]}
        if paper
        else {},
    }
    storage.check_output("--out", out)
    fs, path = storage.filesystem(out)
    root = path.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    storage.write_json(fs, f"{root}/comparison.json", result)
    fs.pipe_file(f"{root}/comparison.md", markdown_table(result).encode())
    fs.pipe_file(f"{root}/report.html", render(result, loaded, baselines, images).encode())
    return result


BASELINE_ROWS = (("initial", INITIAL_ROW), ("reference", "SDXL (50 steps)"))


def _fmt(value) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4g}"


def markdown_table(result: dict) -> str:
    """Table 3's layout: a row per variant, each metric as ours (paper) and the change from the initial generator."""
    metrics = result.get("metrics", METRICS)
    head = "| variant | " + " | ".join(f"{m} ours (paper) Δinit" for m in metrics) + " | guard |"
    lines = [head, "|" + "---|" * (len(metrics) + 2)]
    for role, label in BASELINE_ROWS:
        if role in result["baselines"]:
            ours = result["baselines"][role]["ours"]
            known = PAPER_ROWS[label] if label in result["paper_baselines"] else {}
            cells = [f"{_fmt(ours.get(m))} ({_fmt(known.get(m))})" for m in metrics]
            model = model_label(result["baselines"][role]["model"])
            row = f" (paper row: {label})" if known else ""
            lines.append(f"| {role}: {model}{row} | " + " | ".join(cells) + " | |")
    for row in result["rows"]:
        cells = [
            f"{_fmt(row['ours'].get(m))} ({_fmt(row['paper'].get(m))}) {_signed(row, m)}".rstrip() for m in metrics
        ]
        guard = f"breached at {row['guard_breached_at']}" if row["guard_breached_at"] else ""
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + f" | {guard} |")
    sources = sorted({row["paper_source"] for row in result["rows"] if row.get("paper_source")})
    notes = [f"\nPaper values (in parentheses): {s}." for s in sources] + [
        f"\n{line}" for line in [_no_paper_note(result)] if line
    ]
    return "\n".join(lines) + "\n" + "\n".join(notes) + ("\n" if notes else "")


def _signed(row: dict, metric: str) -> str:
    """The change from the initial generator, with the decimals of the metric's own value."""
    delta = row["vs_initial"].get(metric)
    return "" if delta is None else signed(delta, row["ours"].get(metric))


def _thumbnail(uri: str, side: int = 160) -> str:
    return thumbnail(*storage.filesystem(uri), side=side)


def _no_paper_note(result: dict) -> str:
    families = [f for f in result.get("backbones", ["sdxl"]) if f != "sdxl"]
    if not families:
        return ""
    return (f"No paper values: the paper's tables are SDXL's, and these models include {', '.join(families)}; "
            "compare the rows with each other and with their own baselines.")  # fmt: skip


def render(result: dict, loaded: dict, baselines: dict, images: int) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e = html.escape
    metrics = result.get("metrics", METRICS)
    head = "".join(f"<th colspan='3'>{e(m)}</th>" for m in metrics)
    sub = "".join("<th>ours</th><th>paper</th><th>Δ initial</th>" for _ in metrics)
    body = []
    for role, label in BASELINE_ROWS:
        if role in result["baselines"]:
            ours = result["baselines"][role]["ours"]
            known = PAPER_ROWS[label] if label in result["paper_baselines"] else {}
            cells = "".join(f"<td>{_fmt(ours.get(m))}</td><td>{_fmt(known.get(m))}</td><td></td>" for m in metrics)
            model = model_label(result["baselines"][role]["model"])
            row = f" (paper row: {e(label)})" if known else ""
            body.append(f"<tr class='baseline'><td>{e(role)}: {e(model)}{row}</td>{cells}<td></td></tr>")
    for row in result["rows"]:
        cells = "".join(
            f"<td>{_fmt(row['ours'].get(m))}</td><td>{_fmt(row['paper'].get(m))}</td><td>{_signed(row, m)}</td>"
            for m in metrics
        )
        guard = f"breached at {row['guard_breached_at']}" if row["guard_breached_at"] else ""
        label = f" <small>(paper: {e(row['paper_row'])})</small>" if row["paper_row"] else ""
        body.append(f"<tr class='variant'><td>{e(row['variant'])}{label}</td>{cells}<td>{e(guard)}</td></tr>")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>distar ablation</title><style>"
        "body{font-family:sans-serif;margin:1em}td,th{padding:3px 6px;border-bottom:1px solid #ddd;font-size:13px}"
        ".baseline{color:#555}img{margin:2px}.scroll{overflow-x:auto;max-width:100%}</style></head><body>"
        "<h1>distar ablation</h1>",
        (
            "<p style='background:#fff4d6;border-left:4px solid #e0a000;padding:4px 8px'>Tiny preset: random tiny "
            "models and rewards. The table shows that the sweep works end to end, not how the variants compare.</p>"
            if runs_on_tiny({"protocol": result["protocol"]})
            else ""
        ),
        f"<p>{len(result['rows'])} variants under protocol <code>{e(str(result['protocol_digest']))}</code>"
        + (
            f"; protocol mismatches allowed: {e(json.dumps(result['protocol_mismatches']))}"
            if result["protocol_mismatches"]
            else ""
        )
        + "</p>",
        # wider than the pipeline UI's frame with five metrics: the table scrolls inside its own box
        f"<div class='scroll'><table id='comparison'><tr><th rowspan='2'>variant</th>{head}"
        f"<th rowspan='2'>guard</th></tr><tr>{sub}</tr>{''.join(body)}</table></div>",
        "".join(
            f"<p>Paper values: {e(src)}.</p>"
            for src in sorted({row["paper_source"] for row in result["rows"] if row.get("paper_source")})
        ),
        "".join(f"<p>{e(line)}</p>" for line in [_no_paper_note(result)] if line),
        "<h2>The same prompts across variants</h2>",
    ]
    columns = [(f"{role}", uri, r) for role, (uri, r) in baselines.items()] + [
        (name, uri, r) for name, (uri, r) in loaded.items()
    ]
    texts = _prompt_texts(columns[-1][1])
    ids = _shared_image_ids(columns)[:images]
    head = "".join(f"<th>{e(c[0])}</th>" for c in columns)
    grid = [f"<div class='scroll'><table id='images'><tr><th>prompt</th>{head}</tr>"]
    for pid in ids:
        prompt = texts.get(pid, pid)
        cells = "".join(f"<td><img width='160' src='{_thumbnail(_image_uri(uri, pid))}'></td>" for _, uri, _ in columns)
        grid.append(f"<tr><td>{e(prompt)}</td>{cells}</tr>")
    parts.append("".join(grid) + "</table></div><h2>Training curves</h2>")
    keys = sorted({k for row in result["rows"] for k in row["curves"]})
    for key in keys:
        series = [(row["variant"], row["curves"].get(key, [])) for row in result["rows"]]
        if not any(points for _, points in series):
            continue
        fig, ax = plt.subplots(figsize=(5.2, 3.0), dpi=100)
        for name, points in series:
            if points:
                ax.plot(*zip(*points, strict=True), marker="." if len(points) < 30 else None, label=name)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
        parts.append(f"<img alt='{e(key)}' src='data:image/png;base64,{png_base64(fig)}'>")
        plt.close(fig)
    parts.append(
        f"<h2>Protocol</h2><details><summary>the full protocol</summary>"
        f"<pre>{e(json.dumps(result['protocol'], indent=1))}</pre></details></body></html>"
    )
    return "\n".join(parts)


def _image_uri(evaluation: str, pid: str) -> str:
    root = str(evaluation)[: -len("/metrics.json")] if str(evaluation).endswith("metrics.json") else str(evaluation)
    return f"{root.rstrip('/')}/images/model/{pid}.png"


def _shared_image_ids(columns) -> list[str]:
    """Prompt ids every evaluation generated, in the order of the first one (the same seeds: the same noise)."""
    sets = []
    for _, uri, _ in columns:
        fs, path = storage.filesystem(_image_uri(uri, "x").rsplit("/", 1)[0])
        sets.append([p.rsplit("/", 1)[-1].removesuffix(".png") for p in sorted(fs.glob(f"{path}/*.png"))])
    shared = set(sets[0]).intersection(*sets[1:]) if sets else set()
    return [pid for pid in sets[0] if pid in shared]


def _prompt_texts(evaluation: str) -> dict[str, str]:
    import pyarrow.parquet as pq

    root = _image_uri(evaluation, "x").rsplit("/images/", 1)[0]
    fs, path = storage.filesystem(f"{root}/scores.parquet")
    if not fs.exists(path):
        return {}
    with fs.open(path, "rb") as fh:
        table = pq.read_table(fh, columns=["id", "prompt"])
    return dict(zip(table.column("id").to_pylist(), table.column("prompt").to_pylist(), strict=True))
