"""The ablation pipeline: its committed YAML is a fresh compile, a two-variant sweep of the tiny preset runs
under kfp.local and its comparison parses (a row per variant, the paper's rows), a second sweep reuses the
baselines (counted: nothing generated again), and `distar evaluate` refuses a comparison across protocols."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
YAML = ROOT / "pipelines" / "distar_ablation.yaml"


def test_committed_ablation_yaml_is_a_fresh_compile(tmp_path):
    fresh = tmp_path / "fresh.yaml"
    env = {k: v for k, v in os.environ.items() if k not in ("DISTAR_IMAGE", "DISTAR_CPU_IMAGE")}
    subprocess.run(
        [sys.executable, str(ROOT / "pipelines" / "distar_ablation.py"), "--out", str(fresh)],
        check=True,
        env=env,
        cwd=tmp_path,
    )
    assert fresh.read_text() == YAML.read_text(), "stale: run python pipelines/distar_ablation.py"


def test_the_sweep_fans_out_over_the_variants_and_in_to_compare():
    spec = next(yaml.safe_load_all(YAML.read_text()))
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"curate", "cache", "baseline", "baseline-2", "for-loop-1", "compare"}
    loop = tasks["for-loop-1"]
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--variants"
    assert loop["iteratorPolicy"]["parallelismLimit"] == 3
    assert set(spec["components"]["comp-for-loop-1"]["dag"]["tasks"]) == {"train", "export", "evaluate"}
    assert set(tasks["compare"]["dependentTasks"]) == {"baseline", "baseline-2", "for-loop-1"}
    from distar.compare import TABLE3

    variants = spec["root"]["inputDefinitions"]["parameters"]["variants"]["defaultValue"]
    assert [v["name"] for v in variants] == [v["name"] for v in TABLE3]


def _uses(root: Path) -> list[list[dict]]:
    """Per baseline (one directory per model and protocol), every evaluation call and what it generated."""
    return [json.loads(f.read_text()) for f in sorted((root / "training-runs" / "baselines").glob("*/uses.json"))]


@pytest.mark.slow
def test_a_two_variant_sweep_runs_locally_and_a_second_reuses_the_baselines(tmp_path):
    from distar.local_pipeline import run_local, tiny_ablation_arguments

    root = tmp_path / "root"
    run = run_local("tiny", root, pipeline="ablation")
    comparison = json.loads((run / "compare" / "comparison").read_text())
    assert sorted(r["variant"] for r in comparison["rows"]) == ["kl-rew100", "score-rew100"]
    assert not comparison["protocol_mismatches"]
    paper = {r["variant"]: r["paper_row"] for r in comparison["rows"]}
    assert paper == {"score-rew100": "DI*-IN (100, 7.5)", "kl-rew100": "DI++ (KL) (100, 7.5)"}
    assert all(r["curves"]["reward"] and r["ours"] for r in comparison["rows"])
    table = (run / "compare" / "table").read_text()
    assert "| initial: initial generator tianweiy/DMD2" in table and "(paper row: DMD2 init)" in table
    page = (run / "compare" / "report").read_text()
    from helpers.html_check import in_sandboxed_iframe, outside_references, screenshot

    assert outside_references(page) == []  # shown alone in KFP's sandboxed iframe
    # in the pipeline UI's 600 px frame: the table on the first screen, scrolling in its own box, not cut off
    seen = in_sandboxed_iframe(page, tmp_path, first_screen=["#comparison"])
    assert seen["images"] > 0 and seen["broken"] == [] and seen["links"] == [] and seen["fetched"] == []
    assert seen["first_screen"] == {"#comparison": True} and seen["overflow_x"] <= 0
    screenshot(page, "comparison-report-tiny-ablation", tmp_path)
    assert "reference sampled in 2 steps" in page and "Tiny preset" in page
    assert "e-0" not in page.split("<h2>")[0]  # no 7.45e-09 deltas
    assert page.count("<tr class='variant'>") == 2 and "1.067" in page and "<h2>Training curves</h2>" in page
    first = _uses(root)
    prompts = comparison["protocol"]["prompts"]
    per_baseline = sum(s["count"] for s in prompts.values())
    assert [[u["generated"] for u in calls] for calls in first] == [[per_baseline], [per_baseline]]

    # a second sweep, other variants, the same protocol: the baselines are not generated again
    one = [v for v in tiny_ablation_arguments()["variants"] if v["name"] == "score-rew100"]
    run_local("tiny", root, overrides={"variants": one}, pipeline="ablation")
    for calls in _uses(root):  # one directory per baseline still; a second call (unless KFP cached the step) reused
        assert calls[0]["generated"] == per_baseline and all(c["reused"] and c["generated"] == 0 for c in calls[1:])


def test_evaluate_refuses_a_comparison_across_protocols_before_generating(tmp_path, capsys):
    """`distar evaluate --compare-to` reads the other run's protocol first: a different seed is named and nothing
    is generated (exit 2)."""
    from helpers.tiny import tiny

    from distar.cli import main

    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.json").write_text(json.dumps({"model": "m", "protocol": {"seed": 7}, "results": {"model": {}}}))
    out = tmp_path / "eval"
    code = main(
        [
            "evaluate",
            "--model",
            "reference:2",
            "--reference",
            tiny("tiny:sdxl"),
            "--out",
            str(out),
            "--prompts",
            tiny("tiny:prompts/part-00000.parquet"),
            "--rewards",
            "clip",
            "--source",
            f"clip={tiny('tiny:rewards/clip')}",
            "--max-prompts",
            "2",
            "--compare-to",
            str(other),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "another protocol" in err and not (out / "images").exists()
