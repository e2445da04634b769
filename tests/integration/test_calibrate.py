"""`distar calibrate` on the tiny preset: the reward/divergence balance for several α_rew, and its log in training."""

import json

import pytest

from distar import cli
from distar.train import main as train_main

QUIET = ["log.progress=false", "log.tensorboard=false", "parallel.strategy=none"]


def test_calibrate_prints_the_ratio_for_each_alpha_and_it_scales_with_alpha(tmp_path, capsys):
    code = cli.main(["calibrate", "--config", "tiny", "--alphas", "1,100", "--steps", "1", "--json",
                     f"out={tmp_path / 'c'}", *QUIET])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    rows = json.loads(out[out.index("[") :])
    assert [r["alpha_rew"] for r in rows] == [1.0, 100.0]
    # same start, same noise: the reward's pull is linear in α_rew, the divergence's does not depend on it
    assert rows[1]["reward_grad_rms"] / rows[0]["reward_grad_rms"] == pytest.approx(100, rel=1e-3)
    assert rows[1]["divergence_grad_rms"] == pytest.approx(rows[0]["divergence_grad_rms"], rel=1e-3)
    assert rows[0]["reward_to_divergence"] > 0
    assert cli.main(["calibrate", "--config", "tiny", "--alphas", "0", f"out={tmp_path / 'd'}", *QUIET]) == 2
    assert "α_rew values > 0" in capsys.readouterr().err


def test_every_log_step_records_the_balance_and_warm_up_runs_first(tmp_path):
    out = tmp_path / "run"
    assert train_main(["--config", "tiny", f"out={out}", "steps=2", "log.every=1", "assistant_warmup=3", *QUIET]) == 0
    lines = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 0 and lines[0]["warmup/updates"] == 3.0 and "warmup/loss/assistant" in lines[0]
    steps = [line for line in lines if "loss/generator" in line]
    assert len(steps) == 2
    for line in steps:
        ratio = line["balance/reward_to_divergence"]
        assert ratio > 0 and abs(ratio - line["balance/reward_grad_rms"] / line["balance/divergence_grad_rms"]) < 1e-6


HACKING = ["steps=8", "checkpoint.every=2", "log.sample_every=2", "loss.alpha_rew=100000", "generator_optim.lr=1e-2"]


def test_a_diversity_guard_breaches_stops_and_keeps_the_best_checkpoint_for_export(tmp_path, capsys):
    """With a huge α_rew the tiny generator's images of one prompt grow alike; a tight diversity guard stops the run
    with best/ at the last checkpoint before the breach, and export takes it. The same run unguarded goes on."""
    guarded = tmp_path / "guarded"
    guard = ["guard.seeds=3", 'guard.heldout=["clip"]', "guard.min_diversity=0.8", "guard.stop_on_breach=true"]
    assert train_main(["--config", "tiny", f"out={guarded}", *QUIET, *HACKING, *guard]) == 0
    assert "guard breached at step" in capsys.readouterr().err
    summary = json.loads((guarded / "summary.json").read_text())
    baseline = json.loads((guarded / "guard_baseline.json").read_text())
    lines = [json.loads(line) for line in (guarded / "logs" / "metrics.jsonl").read_text().splitlines()]
    guard_lines = [line for line in lines if "guard/diversity" in line]
    breach = next(line for line in guard_lines if line["guard/breached"])
    assert breach["guard/diversity"] < 0.8 * baseline["guard/diversity"]
    assert summary["step"] == breach["step"] < 8 and summary["stopped_by_guard"]
    assert summary["best"] < breach["step"]
    assert all(not line["guard/breached"] for line in guard_lines if line["step"] <= summary["best"])
    assert {"guard/saturation", "guard/near_black", "guard/near_white", "guard/high_frequency",
            "guard/heldout/clip"} <= set(breach)  # fmt: skip
    report = (guarded / "report.html").read_text()  # the training report: a curve per metric, then the samples
    assert f"guard breached at steps [{breach['step']}]" in report
    grids = len(list((guarded / "samples").glob("step_*.png")))
    from distar.train.report import PANELS  # every quantity is logged in this run: a panel each, then the guards

    curves = len(PANELS) + len([k for k in breach if k.startswith("guard/") and k != "guard/breached"])
    assert grids >= 2 and report.count("<img") == curves + min(grids, 6)  # the sample grids over the run
    code = cli.main(["export", "--checkpoint", f"{guarded}/best", "--out", str(tmp_path / "export")])
    assert code == 0
    assert json.loads((tmp_path / "export" / "distar.json").read_text())["step"] == summary["best"]

    unguarded = tmp_path / "unguarded"
    assert train_main(["--config", "tiny", f"out={unguarded}", *QUIET, *HACKING]) == 0
    assert json.loads((unguarded / "summary.json").read_text())["step"] == 8
    assert cli.main(["export", "--checkpoint", f"{unguarded}/best", "--out", str(tmp_path / "e2")]) == 2
