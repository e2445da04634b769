"""Recorded loss curves (torchtitan's guard): a short run of each tiny preset (SDXL's, and the flow families'
tiny-sd3 and tiny-flux) on the CPU, fixed seed, one process, checked step by step against
tests/data/loss_curve_<preset>.json. A silent change in the training math (a loss term, a
weighting, a random stream, the optimizer) moves these numbers far beyond the tolerance, which only absorbs the
rounding differences between CPU types.

After an intended change of the math, record the curve again and say why in the commit:
    DISTAR_RECORD_LOSS_CURVE=1 .venv/bin/python -m pytest tests/integration/test_loss_curve.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from distar.train import run

DATA = Path(__file__).resolve().parents[1] / "data"
OVERRIDES = ["steps=6", "assistant_updates=2", "parallel.strategy=none", "log.every=1", "log.sample_every=100",
             "log.progress=false", "log.tensorboard=false", "checkpoint.every=100", "loss.alpha_rew=1000"]  # fmt: skip
KEYS = ("loss/generator", "loss/divergence", "loss/reward", "loss/assistant", "divergence", "reward",
        "grad_norm/generator", "grad_norm/assistant")  # fmt: skip
# Float32 sums differ in their last bits between CPU kernels (AVX2, AVX-512, Arm); six steps keep that far below 1e-3.
RTOL, ATOL = 1e-3, 1e-6


def _curve(preset: str, out: Path) -> list[dict]:
    run(preset, [f"out={out}", *OVERRIDES])
    lines = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [{"step": line["step"], **{k: line[k] for k in KEYS}} for line in lines if "loss/generator" in line]


@pytest.mark.parametrize("preset", ["tiny", "tiny-sd3", "tiny-flux"])
def test_the_tiny_run_follows_its_recorded_loss_curve(preset, tmp_path):
    record = DATA / f"loss_curve_{preset}.json"
    curve = _curve(preset, tmp_path / "run")
    assert [c["step"] for c in curve] == list(range(1, 7))
    if os.environ.get("DISTAR_RECORD_LOSS_CURVE") == "1":
        record.write_text(json.dumps({"overrides": OVERRIDES, "curve": curve}, indent=1) + "\n")
    recorded = json.loads(record.read_text())
    assert recorded["overrides"] == OVERRIDES, "the recorded run used other settings: record it again"
    for got, want in zip(curve, recorded["curve"], strict=True):
        for key in KEYS:
            assert got[key] == pytest.approx(want[key], rel=RTOL, abs=ATOL), f"step {got['step']}, {key}"
    # the curve moves: a run that trained nothing would match a flat record too
    assert curve[0]["loss/assistant"] != curve[-1]["loss/assistant"]
