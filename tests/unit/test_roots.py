"""Every step that hands a location to other pods refuses one that is not object storage (KFP's default root is
minio://…, which fsspec cannot open), before a TrainJob or any other work starts, with the fix in the message."""

from __future__ import annotations

import json

import pytest
from helpers.kfp_artifacts import at
from kfp.dsl import Artifact, Dataset, Model

from distar import storage
from distar.cli import main
from distar.errors import UserError

MINIO = "minio://mlpipeline/v2/artifacts/distar/run/prompts"


@pytest.mark.parametrize("uri", ["gs://b/x", "s3://b/x"])
def test_object_storage_is_shared(uri):
    storage.check_shared("runs_root", uri)


@pytest.mark.parametrize("uri", [MINIO, "https://host/x", "file:///x", "/local/x", "hf://org/x"])
def test_anything_else_is_refused_with_the_fix(uri):
    with pytest.raises(UserError, match="runs_root") as err:
        storage.check_shared("runs_root", uri)
    assert "gs://" in str(err.value) and "s3://" in str(err.value)
    if uri.startswith("minio://"):
        assert "--pipeline-root" in str(err.value)


def test_a_local_path_is_shared_only_where_everything_is_local():
    storage.check_shared("runs_root", "/local/x", local_ok=True)
    for uri in (MINIO, "https://host/x"):
        with pytest.raises(UserError):
            storage.check_shared("runs_root", uri, local_ok=True)


def _model_cache(tmp_path, root: str):
    path = tmp_path / "model_cache.json"
    path.write_text(json.dumps({"root": root}))
    return at(Artifact, "gs://b/kfp/cache", str(path))


@pytest.mark.parametrize("launcher", ["trainjob", "local"])
@pytest.mark.parametrize(
    "runs_root, cache_root, prompts_uri, named",
    [
        ("https://host/runs", "gs://b/cache", "gs://b/kfp/prompts", "runs_root"),
        ("gs://b/runs", "minio://mlpipeline/cache", "gs://b/kfp/prompts", "cache_root"),
        ("gs://b/runs", "gs://b/cache", MINIO, "pipeline root"),
    ],
)
def test_the_train_step_refuses_before_launching(
    tmp_path, monkeypatch, launcher, runs_root, cache_root, prompts_uri, named
):
    from components.train import train
    from distar.train import launch

    def never(*args, **kwargs):
        raise AssertionError("a launcher was called")

    monkeypatch.setattr(launch, "run_trainjob", never)
    monkeypatch.setattr(launch, "run_local", never)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=named):
        train(
            prompts=at(Dataset, prompts_uri),
            model_cache=_model_cache(tmp_path, cache_root),
            run=at(Artifact, "gs://b/kfp/run", str(out / "run")),
            metrics=at(Artifact, "gs://b/kfp/metrics", str(out / "metrics")),
            report=at(Artifact, "gs://b/kfp/report", str(out / "report")),
            runs_root=runs_root,
            run_id="r",
            task_name="train",
            launcher=launcher,
        )


def test_the_train_step_takes_local_paths_under_the_local_launcher_only(tmp_path, monkeypatch):
    from components.train import train
    from distar.train import launch

    calls = []
    monkeypatch.setattr(launch, "run_local", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(KeyError("ran")))
    args = dict(
        prompts=at(Dataset, str(tmp_path / "prompts"), str(tmp_path / "prompts")),
        model_cache=_model_cache(tmp_path, str(tmp_path / "cache")),
        run=at(Artifact, str(tmp_path / "run")),
        metrics=at(Artifact, str(tmp_path / "metrics")),
        report=at(Artifact, str(tmp_path / "report")),
        runs_root=str(tmp_path / "runs"),
        run_id="r",
        task_name="train",
    )
    with pytest.raises(KeyError, match="ran"):
        train(**args, launcher="local")
    assert len(calls) == 1
    with pytest.raises(UserError, match="runs_root"):
        train(**args, launcher="trainjob")


@pytest.mark.parametrize(
    "runs_root, cache_root, named",
    [(MINIO, "gs://b/cache", "runs_root"), ("/local/runs", "gs://b/cache", "runs_root"), *[
        ("gs://b/runs", bad, "cache_root") for bad in (MINIO, "/local/cache")
    ]],
)  # fmt: skip
def test_export_and_evaluate_refuse_before_reading_anything(tmp_path, runs_root, cache_root, named):
    """They write the exported pipeline and the evaluation under runs_root, which the next steps and the user read:
    on a cluster (the pipeline root is a URI) only object storage will do; a local path only under kfp.local."""
    from components.evaluate import evaluate
    from components.export import export

    run = tmp_path / "run.json"
    run.write_text(json.dumps({"checkpoint": "gs://b/runs/r/train/checkpoints/step_1", "variant": ""}))
    exported = tmp_path / "pipeline.json"
    exported.write_text(json.dumps({"pipeline": "gs://b/runs/r/export"}))
    where = {"runs_root": runs_root, "run_id": "r", "task_name": "t"}
    if named == "runs_root":
        with pytest.raises(UserError, match=named):
            export.python_func(
                run=at(Artifact, "gs://b/kfp/run", str(run)), pipeline=at(Model, "gs://b/kfp/pipeline"), **where
            )
    with pytest.raises(UserError, match=named):
        evaluate.python_func(
            pipeline=at(Model, "gs://b/kfp/pipeline", str(exported)),
            model_cache=_model_cache(tmp_path, cache_root),
            metrics=at(Artifact, "gs://b/kfp/metrics"),
            report=at(Artifact, "gs://b/kfp/report"),
            evaluation=at(Artifact, "gs://b/kfp/evaluation"),
            **where,
        )


@pytest.mark.parametrize("out", ["out=https://host/run", "out=/local/run", f"out={MINIO}"])
def test_trainjob_render_refuses_with_exit_2(out, capsys):
    code = main(["trainjob", "render", "--image", "i", "--name", "distar-x", out, "data.prompts=gs://b/p"])
    assert code == 2
    err = capsys.readouterr().err
    assert "out" in err and "gs://" in err and "Traceback" not in err
