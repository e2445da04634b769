"""`distar lab digits --quick`: the production trainer, export and comparison on real digits, end to end. Asserts
the mechanics that hold on every seed, never the paper's scientific claim (docs/LAB.md has the full run's numbers)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("lab") / "lab"
    cmd = [sys.executable, "-m", "distar.cli", "-q", "lab", "digits", "--out", str(out), "--quick"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout, json.loads((out / "lab.json").read_text())


def test_every_stage_runs_and_is_recorded(quick):
    out, stdout, lab = quick
    assert list(lab["stages"]) == ["autoencoder", "reference", "rewards", "init"]
    assert lab["stages"]["autoencoder"]["reconstruction_mse"] < 0.05  # on [-1, 1] pixels
    # the reward and the judge are real classifiers of real digits, on images neither saw
    assert lab["stages"]["rewards"]["reward"]["test_accuracy"] > 0.85
    assert lab["stages"]["rewards"]["judge"]["test_accuracy"] > 0.85
    assert lab["real_test_images"]["fd"] == pytest.approx(0.0, abs=1e-6)
    assert set(lab["variants"]) == {"kl-rew100", "score-cfg", "score-rew100"}
    for v in lab["variants"].values():  # every trained generator exported as a stock diffusers pipeline
        assert (Path(v["path"]) / "model_index.json").is_file() and (Path(v["path"]) / "distar.json").is_file()
        assert v["paper_row"]
    assert "3 variants" in stdout


def test_the_one_step_init_is_far_closer_to_real_digits_than_an_untrained_generator(quick):
    _, _, lab = quick
    assert lab["init"]["fd"] < 0.75 * lab["untrained_one_step"]["fd"]


def test_the_reward_rises_with_alpha_rew(quick):
    _, _, lab = quick
    v = lab["variants"]
    assert v["score-rew100"]["reward"] > v["score-cfg"]["reward"] + 1.0  # log p, nats
    assert v["kl-rew100"]["reward"] > v["score-cfg"]["reward"] + 1.0


def test_the_report_is_complete(quick):
    out, _, lab = quick
    assert (out / "pareto.png").stat().st_size > 10_000
    comparison = json.loads((out / "comparison" / "comparison.json").read_text())
    assert comparison["metrics"] == ["accuracy", "diversity", "fd", "heldout", "reward", "reward_accuracy"]
    rows = {r["variant"]: r for r in comparison["rows"]}
    assert rows["score-rew100"]["paper_row"] == "DI*-IN (100, 7.5)" and rows["score-rew100"]["ours"]["fd"] > 0
    assert rows["score-rew100"]["curves"]["reward"], "the training curves come from the variant's run"
    page = (out / "comparison" / "report.html").read_text()
    assert page.count("<tr class='variant'>") == 3 and page.count("data:image/jpeg") == 10 * 5  # 10 digits, 5 models


def test_a_second_run_reuses_every_stage(quick, capsys):
    from distar.lab import LabConfig, run_lab

    out, _, first = quick
    lines = []
    again = run_lab(LabConfig.make(str(out), quick=True), log=lines.append)
    assert sum(line.endswith("reused " + Path(s["path"]).name) for line in lines for s in first["stages"].values()) == 4
    assert not any("building" in line for line in lines)
    assert again["variants"]["score-rew100"]["fd"] == pytest.approx(first["variants"]["score-rew100"]["fd"], rel=1e-6)
