"""Submitting the compiled pipeline: `distar submit` (kfp.Client) and the kfp CLI, against a fake KFP server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.fake_kfp import FakeKFP

from distar.errors import UserError
from distar.submit import parse_arguments, submit

PACKAGE = Path(__file__).resolve().parents[2] / "pipelines" / "distar_sdxl.yaml"
ROOTS = ["cache_root=gs://b/cache", "runs_root=gs://b/runs"]


def _spec(body: dict) -> dict:
    """The pipeline spec of a run request (kfp wraps it with the platform spec when there is one)."""
    spec = body["pipeline_spec"]
    return spec.get("pipeline_spec", spec)


def _run_body(fake: FakeKFP) -> dict:
    posts = [body for method, path, body in fake.requests if method == "POST" and path == "/apis/v2beta1/runs"]
    assert len(posts) == 1
    return posts[0]


def test_distar_submit_sends_the_pipeline_arguments_root_and_experiment():
    with FakeKFP() as fake:
        args = parse_arguments(["nproc_per_node=4", 'prompt_sources=["gs://b/p.parquet"]', "preset=sdxl", *ROOTS])
        result = submit(
            fake.url,
            PACKAGE,
            args,
            experiment="distar",
            run_name="r1",
            pipeline_root="gs://b/root",
            enable_caching=False,
            service_account="pipeline-runner",
        )
        body = _run_body(fake)
        assert result["run_id"] in fake.runs and result["run_url"].endswith(result["run_id"])
        assert body["display_name"] == "r1"
        assert body["runtime_config"]["pipeline_root"] == "gs://b/root"
        assert body["service_account"] == "pipeline-runner"
        assert body["runtime_config"]["parameters"]["cache_root"] == "gs://b/cache"
        assert body["runtime_config"]["parameters"]["nproc_per_node"] == 4
        assert body["runtime_config"]["parameters"]["prompt_sources"] == ["gs://b/p.parquet"]
        assert _spec(body)["pipelineInfo"]["name"] == "distar-sdxl"
        assert "kubernetes" in body["pipeline_spec"]["platform_spec"]["platforms"]  # kfp-kubernetes settings sent
        exp = next(e for e in fake.experiments.values() if e["display_name"] == "distar")
        assert body["experiment_id"] == exp["experiment_id"]
        # caching off reaches every task of the submitted spec
        tasks = _spec(body)["root"]["dag"]["tasks"]
        assert all(not t.get("cachingOptions", {}).get("enableCache") for t in tasks.values())


def test_submit_refuses_unknown_arguments_and_unreachable_servers(tmp_path):
    with pytest.raises(UserError, match=r"unknown pipeline argument\(s\) \['stepz'\]"):
        submit("http://127.0.0.1:9", PACKAGE, {"stepz": 3})
    with pytest.raises(UserError, match="does not exist"):
        submit("http://127.0.0.1:9", tmp_path / "none.yaml", {})
    roots = parse_arguments(ROOTS)
    with pytest.raises(UserError, match="could not submit"):
        submit("http://127.0.0.1:9", PACKAGE, roots)
    with pytest.raises(UserError, match="needs cache_root=…, runs_root=…"):
        submit("http://127.0.0.1:9", PACKAGE, {})
    for root in ("minio://mlpipeline/v2/artifacts", "/data/kfp", "https://storage.googleapis.com/b"):
        with pytest.raises(UserError, match=r"--pipeline-root .* gs://BUCKET/… or s3://BUCKET/…"):
            submit("http://127.0.0.1:9", PACKAGE, roots, pipeline_root=root)
    with pytest.raises(UserError, match="runs_root '/runs'"):
        submit("http://127.0.0.1:9", PACKAGE, {**roots, "runs_root": "/runs"})
    with pytest.raises(UserError, match="not key=value"):
        parse_arguments(["preset"])


@pytest.mark.parametrize(
    "pair, message",
    [
        ("num_nodes=four", 'num_nodes="four": it must be a whole number'),
        ("num_nodes=2.5", "must be a whole number"),
        ("ema=yes", "must be true or false"),
        ("train_overrides=steps=1", "must be a JSON list"),
        ("queue=Team-Queue", "a Kubernetes name"),
        ("storage_secret=my;secret", "a Kubernetes name"),
        ("trainer_service_account=" + "a" * 300, "a Kubernetes name"),
    ],
)
def test_submit_checks_argument_types_and_kubernetes_names_before_the_server(pair, message):
    with pytest.raises(UserError, match=message):  # the unreachable server is never asked
        submit("http://127.0.0.1:9", PACKAGE, {**parse_arguments(ROOTS), **parse_arguments([pair])})


def test_the_kfp_cli_form_the_readme_documents():
    kfp = Path(sys.executable).parent / "kfp"
    with FakeKFP() as fake:
        proc = subprocess.run(
            [
                str(kfp),
                "--endpoint",
                fake.url,
                "run",
                "create",
                "-e",
                "distar",
                "-f",
                str(PACKAGE),
                "preset=sdxl",
                "nproc_per_node=2",
                *ROOTS,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=os.environ.copy(),
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        body = _run_body(fake)
        assert body["runtime_config"]["parameters"]["nproc_per_node"] in (2, "2")
        assert _spec(body)["pipelineInfo"]["name"] == "distar-sdxl"


def test_distar_submit_pipeline_ablation_sends_the_sweep(capsys):
    from distar.cli import main

    with FakeKFP() as fake:
        code = main(["submit", "--host", fake.url, "--pipeline", "ablation", "--pipeline-root", "s3://b/kfp", *ROOTS])
        assert code == 0, capsys.readouterr().err
        body = _run_body(fake)
    assert _spec(body)["pipelineInfo"]["name"] == "distar-ablation"
    assert body["runtime_config"]["parameters"]["runs_root"] == "gs://b/runs"
    assert main(["submit", "--host", "http://127.0.0.1:9", "--pipeline", "table3"]) == 2
    assert "choose sdxl or ablation" in capsys.readouterr().err


def test_a_multi_user_deployment_takes_a_token_from_the_flag_or_the_environment_or_a_cookie(monkeypatch):
    args = parse_arguments(ROOTS)
    with FakeKFP(token="tok-123", cookie="authservice_session=abc") as fake:
        monkeypatch.delenv("KF_PIPELINES_TOKEN", raising=False)
        with pytest.raises(UserError, match="could not submit"):
            submit(fake.url, PACKAGE, args)
        assert fake.refused and not fake.runs
        submit(fake.url, PACKAGE, args, token="tok-123")
        submit(fake.url, PACKAGE, args, cookies="authservice_session=abc")
        monkeypatch.setenv("KF_PIPELINES_TOKEN", "tok-123")
        submit(fake.url, PACKAGE, args)
        assert len(fake.runs) == 3


def test_an_empty_secret_name_is_refused_before_the_server_sees_it():
    with FakeKFP() as fake:
        for key in ("storage_secret", "hub_secret"):
            with pytest.raises(UserError, match=f"{key}=''"):
                submit(fake.url, PACKAGE, {**parse_arguments(ROOTS), key: ""})
        assert fake.requests == []


def test_submit_help_names_what_kfps_cli_cannot_set():
    proc = subprocess.run(
        [sys.executable, "-m", "distar.cli", "submit", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert "--token" in text and "KF_PIPELINES_TOKEN" in text and "--cookies" in text
    assert "its `-r` is the run's name" in text
