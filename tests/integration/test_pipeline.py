"""The Kubeflow pipeline: the committed YAML is a fresh compile, and the whole DAG runs under kfp.local."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
YAML = ROOT / "pipelines" / "distar_sdxl.yaml"


def test_committed_yaml_is_a_fresh_compile(tmp_path):
    fresh = tmp_path / "fresh.yaml"
    env = {k: v for k, v in os.environ.items() if k not in ("DISTAR_IMAGE", "DISTAR_CPU_IMAGE")}
    code = (
        f"import runpy; m = runpy.run_path({str(ROOT / 'pipelines' / 'distar_sdxl.py')!r}); "
        f"m['compile_pipeline']({str(fresh)!r})"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path)
    assert fresh.read_text() == YAML.read_text(), (
        "pipelines/distar_sdxl.yaml is stale: run python pipelines/distar_sdxl.py"
    )


def test_compiled_dag_and_defaults():
    spec = next(yaml.safe_load_all(YAML.read_text()))
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"curate", "cache", "train", "export", "evaluate"}
    deps = {name: set(t.get("dependentTasks", [])) for name, t in tasks.items()}
    assert deps["train"] == {"curate", "cache"} and deps["export"] == {"train"}
    assert deps["evaluate"] == {"export", "cache"}
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["preset"]["defaultValue"] == "sdxl" and params["nproc_per_node"]["defaultValue"] == 8
    assert tasks["train"]["cachingOptions"] == {} and tasks["cache"]["cachingOptions"]["enableCache"]
    assert tasks["train"]["retryPolicy"]["maxRetryCount"] == 2
    assert {k for k, p in params.items() if "defaultValue" not in p} == {"cache_root", "runs_root"}


def test_kubernetes_settings_of_the_steps():
    docs = list(yaml.safe_load_all(YAML.read_text()))
    assert len(docs) == 2  # the pipeline spec, then the platform spec kfp-kubernetes writes
    executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert len(executors) == 5
    for name, settings in executors.items():
        assert {s["secretNameParameter"]["componentInputParameter"] for s in settings["secretAsEnv"]} == {
            "storage_secret",
            "hub_secret",
        }
        assert not any(s.get("optional") for s in settings["secretAsEnv"])  # required: KFP < 2.15 ignores it
        gpu = name == "exec-evaluate"
        assert ("emptyDirMounts" in settings) == gpu and ("nodeSelector" in settings) == gpu, name
    evaluate = docs[0]["deploymentSpec"]["executors"]["exec-evaluate"]["container"]["resources"]
    assert evaluate["accelerator"]["resourceType"] == "nvidia.com/gpu"


def test_no_step_takes_the_model_cache_or_a_checkpoint_directory_as_an_input_artifact():
    """KFP's launcher copies every input artifact before a step starts: what crosses steps is small records."""
    spec = next(yaml.safe_load_all(YAML.read_text()))
    inputs = {
        (task, name): spec["components"][t["componentRef"]["name"]]["inputDefinitions"]["artifacts"][name]
        for task, t in spec["root"]["dag"]["tasks"].items()
        for name in t.get("inputs", {}).get("artifacts", {})
    }
    assert set(inputs) == {
        ("train", "prompts"),
        ("train", "model_cache"),
        ("export", "run"),
        ("evaluate", "pipeline"),
        ("evaluate", "model_cache"),
    }
    assert inputs[("train", "model_cache")]["artifactType"]["schemaTitle"] == "system.Artifact"
    assert inputs[("export", "run")]["artifactType"]["schemaTitle"] == "system.Artifact"


def _evaluate_processes() -> list[int]:
    """This test's kfp.local processes running the evaluate component (the shell and its python)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if b"--function_to_execute" in args and args[args.index(b"--function_to_execute") + 1 :][:1] == [b"evaluate"]:
            found.append((int(proc.name), parent))
    ours = {os.getpid()}
    for _ in range(4):  # descendants of this process only
        ours |= {pid for pid, parent in found if parent in ours}
    return sorted(ours - {os.getpid()})


def _kill_evaluate_midway(runs_root: Path, done: threading.Event, killed: list) -> None:
    """SIGKILL the evaluate step once it has finished its first score shard, as a node lost midway would."""
    while not done.is_set():
        if list(runs_root.glob("*/evaluate/work/model/scores-*.parquet")):
            for pid in _evaluate_processes():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            return
        time.sleep(0.01)


@pytest.mark.slow
def test_the_whole_dag_runs_locally_on_the_tiny_preset_and_a_killed_evaluate_resumes_when_retried(tmp_path):
    """The tiny DAG under kfp.local, whose retry policy is the compiled one; the evaluate step is killed after its
    first score shard and retried by kfp.local with the same inputs: no prompt scored twice, none missing."""
    import pyarrow.parquet as pq

    from distar.local_pipeline import run_local

    done, killed = threading.Event(), []
    watcher = threading.Thread(target=_kill_evaluate_midway, args=(tmp_path / "root" / "training-runs", done, killed))
    watcher.start()
    try:
        run = run_local("tiny", tmp_path / "root", overrides={"eval_batch_size": 2})
    finally:
        done.set()
        watcher.join()
    assert killed, "the evaluate step finished before its first shard was seen"
    prompts = json.loads((run / "curate" / "prompts" / "manifest.json").read_text())
    assert prompts["rows"] > 200
    cache = json.loads((run / "cache" / "model_cache").read_text())  # the manifest, not the cache
    assert "stabilityai/stable-diffusion-xl-base-1.0" in cache["entries"]
    assert (
        cache["root"] == str(tmp_path / "root" / "model-cache") and (run / "cache" / "model_cache").stat().st_size < 1e5
    )
    record = json.loads((run / "train" / "run").read_text())
    assert record["run"].startswith(str(tmp_path / "root" / "training-runs"))
    assert (Path(record["checkpoint"]) / "COMPLETE").is_file() and record["checkpoint"].endswith("step_00000004")
    train_metrics = json.loads((run / "train" / "executor_output.json").read_text())["artifacts"]["metrics"]
    assert {"reward", "divergence", "images_per_s"} <= set(train_metrics["artifacts"][0]["metadata"])
    assert "<img" in (run / "train" / "report").read_text()
    exported = json.loads((run / "export" / "pipeline").read_text())  # a record: the pipeline is read by URI
    assert Path(exported["pipeline"]).parent == Path(record["run"]).parent and exported["dtype"] == "fp16"
    assert (Path(exported["pipeline"]) / "model_index.json").is_file() and exported["step"] == 4
    assert (run / "export" / "pipeline").stat().st_size < 1e4
    evaluation = json.loads((run / "evaluate" / "evaluation").read_text())
    results = Path(evaluation["out"])
    assert results.parent == Path(record["run"]).parent and evaluation["model"] == exported["pipeline"]
    shard_ids = [
        i for f in (results / "work" / "model").glob("scores-*.parquet") for i in pq.read_table(f)["id"].to_pylist()
    ]
    assert len(shard_ids) == len(set(shard_ids)) == evaluation["prompts"] > 4  # none twice, none missing
    scored = pq.read_table(results / "scores.parquet")["id"].to_pylist()
    assert sorted(scored) == sorted(shard_ids)
    model_run = evaluation["runs"]["model"]  # the retried attempt's bookkeeping
    assert model_run["skipped"] >= 2 and model_run["generated"] + model_run["skipped"] == evaluation["prompts"]
    outputs = json.loads((run / "evaluate" / "executor_output.json").read_text())["artifacts"]
    metrics = outputs["metrics"]["artifacts"][0]["metadata"]
    for name in ("imagereward", "aesthetic", "pickscore", "clip", "hpsv2.1"):
        assert math.isfinite(metrics[name]), name
    assert "<table id='metrics'>" in (run / "evaluate" / "report").read_text()
    from helpers.html_check import in_sandboxed_iframe, outside_references, screenshot

    # the HTML artifacts as the pipeline UI shows them, in a 600 px frame: what the reader came for on the first
    # screen (the run's facts and its first panels; the metrics table), nothing cut off at the right
    for step, first in (("train", ["#facts", "#panels"]), ("evaluate", ["#metrics"])):
        html = (run / step / "report").read_text()
        assert outside_references(html) == [], step
        seen = in_sandboxed_iframe(html, tmp_path, first_screen=first)
        assert seen["images"] > 0 and seen["broken"] == [] and seen["links"] == [] and seen["fetched"] == [], step
        assert all(seen["first_screen"].values()) and seen["overflow_x"] <= 0, (step, seen)
        screenshot(html, f"{step}-report-tiny-pipeline", tmp_path)
    training = (run / "train" / "report").read_text()
    for panel in ("reward", "divergence", "gradient norms", "learning rate", "throughput"):
        assert f"alt='{panel}'" in training, panel
    assert "step 4 of 4" in training and "tiny preset" in training and "<details>" in training
    from urllib.parse import unquote, urlparse

    from distar.local_pipeline import describe

    urls = [line.split()[0] for line in describe(run, "tiny") if line.strip().startswith("file://")]
    reports = [u for u in urls if "/report" in u]
    assert len(reports) == 2 and all(u.endswith("/report.html") for u in reports)  # train's and evaluate's
    assert len(urls) >= 8 and all(Path(unquote(urlparse(u).path)).exists() for u in urls)
    lineage = json.loads((run / "train" / "executor_output.json").read_text())["artifacts"]["run"]
    assert lineage["artifacts"][0]["metadata"]["step"] == 4
