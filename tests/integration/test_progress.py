"""Rank 0's progress reports (distar.train.progress, through the kubeflow SDK) against an HTTPS stand-in of the
TrainJob status endpoint: authenticated, valid for the v2.3.0 CRD, wired into the training loop, and never a
reason for training to stop."""

from __future__ import annotations

import pytest
from helpers.trainer_status import status_server

from distar.train.progress import ProgressReporter, eta_seconds, status_metrics

FAST = ["log.progress=false", "log.tensorboard=false", "parallel.strategy=none"]


@pytest.fixture(autouse=True)
def _fresh_sdk_state():
    """The SDK keeps its throttle clock and token in module globals: each test starts as a new process would."""
    from kubeflow.trainer.backends.kubernetes import utils

    utils._last_update_time, utils._cached_token = 0.0, None
    yield
    utils._last_update_time, utils._cached_token = 0.0, None


def test_eta_and_metrics_closed_forms():
    assert eta_seconds(step=30, total=100, first_step=10, elapsed_s=40.0) == 140  # 2 s a step, 70 to go
    assert eta_seconds(step=10, total=100, first_step=10, elapsed_s=5.0) is None  # nothing done yet here
    values = {"reward": 21.53125, "divergence": 0.25, "skipped/generator": 3, "grad_norm/generator": 1.0}
    assert status_metrics(values) == {"reward": "21.5312", "divergence": "0.25", "skipped_generator": "3"}


def test_reports_reach_the_status_endpoint_authenticated_and_valid(tmp_path, monkeypatch):
    ticks = iter([0.0, 40.0, 40.0, 80.0, 80.0])
    with status_server(tmp_path) as server:
        for key, value in server.env.items():
            monkeypatch.setenv(key, value)
        reporter = ProgressReporter(total_steps=100, first_step=0, clock=lambda: next(ticks))
        assert reporter.report(20, {"reward": 20.5, "divergence": 0.1, "images_per_s": 3.0})
        assert not reporter.report(21, {"reward": 20.6})  # within the interval: not sent
        assert reporter.finish(100, {"reward": 21.0, "divergence": 0.2})  # waits out the SDK's 5 s floor
    assert server.refused == []
    first, last = server.received
    assert first["progressPercentage"] == 20 and first["estimatedRemainingSeconds"] == 160
    assert {m["name"]: m["value"] for m in first["metrics"]} == {
        "reward": "20.5",
        "divergence": "0.1",
        "images_per_s": "3",
    }
    assert last["progressPercentage"] == 100 and last["estimatedRemainingSeconds"] == 0


@pytest.mark.parametrize("answer", [500, 403])
def test_a_refusing_or_missing_endpoint_warns_once_and_raises_nothing(tmp_path, monkeypatch, capsys, answer):
    with status_server(tmp_path, answer=answer if answer != 403 else 200) as server:
        for key, value in server.env.items():
            monkeypatch.setenv(key, value)
        if answer == 403:
            (tmp_path / "token").write_text("a-stale-token")
        reporter = ProgressReporter(total_steps=10, first_step=0, interval_s=0)
        assert not reporter.report(1, {"reward": 1.0})
        assert not reporter.report(2, {"reward": 1.0}, force=True)
    assert server.received == [] and capsys.readouterr().err.count("progress not reported") == 1
    assert server.refused == (["token", "token"] if answer == 403 else [])
    monkeypatch.setenv("KUBEFLOW_TRAINER_SERVER_URL", "https://127.0.0.1:9/nothing")
    assert not ProgressReporter(total_steps=10, first_step=0).report(1, {})


def test_without_the_injected_variables_the_reporter_is_off(monkeypatch):
    monkeypatch.delenv("KUBEFLOW_TRAINER_SERVER_URL", raising=False)
    reporter = ProgressReporter(total_steps=10, first_step=0)
    assert not reporter.enabled and not reporter.report(5, {"reward": 1.0})


@pytest.mark.slow
def test_a_training_run_reports_its_progress_and_ends_at_100(tmp_path, monkeypatch):
    from distar.train import run

    with status_server(tmp_path) as server:
        for key, value in server.env.items():
            monkeypatch.setenv(key, value)
        summary = run("tiny", [f"out={tmp_path / 'run'}", "steps=3", *FAST])
    assert summary["step"] == 3 and server.refused == []
    assert server.received[0]["progressPercentage"] == 33 and server.received[-1]["progressPercentage"] == 100
    names = {m["name"] for m in server.received[-1]["metrics"]}
    assert {"reward", "divergence", "images_per_s", "skipped_generator", "skipped_assistant"} <= names
    assert set(summary["final"]) >= {"reward", "divergence", "images_per_s"}
