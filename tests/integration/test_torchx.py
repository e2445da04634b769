"""torchx: the `distar.train` component resolves through the entry point and runs 2 processes locally."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_component_builds_a_torchrun_job_for_a_cluster():
    from distar.torchx_components import train

    app = train("--config", "sdxl", "out=gs://b/run", nnodes=4, nproc_per_node=8, gpus_per_node=8, max_retries=3)
    (role,) = app.roles
    assert role.num_replicas == 4 and role.resource.gpu == 8 and role.max_retries == 3
    command = " ".join([role.entrypoint, *role.args])
    assert "torchrun" in command and "--nproc_per_node 8" in command and "-m distar.train" in command
    assert command.endswith("--config sdxl out=gs://b/run")


@pytest.mark.slow
def test_torchx_run_local_cwd_with_two_processes(tmp_path):
    shutil.copy(ROOT / ".torchxconfig", tmp_path / ".torchxconfig")  # read from the working directory
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            str(bin_dir / "torchx"),
            "run",
            "-s",
            "local_cwd",
            "distar.train",
            "--nproc_per_node",
            "2",
            "--",
            "--config",
            "tiny",
            f"out={out}",
            "steps=2",
            "log.progress=false",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "world size 2" in proc.stdout + proc.stderr
    assert (out / "checkpoints" / "step_00000002" / "COMPLETE").is_file()
    assert (tmp_path / "runs" / "torchx").is_dir()  # the log_dir of .torchxconfig's [local_cwd] section


def test_the_documented_kubernetes_dry_run_renders_a_volcano_job_offline(tmp_path):
    """torchx's kubernetes scheduler submits a Volcano Job (the cluster needs Volcano); the dry run of README and
    docs/CLUSTER.md works with no Docker and no API server (--workspace "" and validate_spec=False)."""
    import yaml

    shutil.copy(ROOT / ".torchxconfig", tmp_path / ".torchxconfig")
    torchx = Path(sys.executable).parent / "torchx"
    command = [
        str(torchx),
        "run",
        "--dryrun",
        "-s",
        "kubernetes",
        "--workspace",
        "",
        "-cfg",
        "validate_spec=False",
        "distar.train",
        "--nnodes",
        "2",
        "--nproc_per_node",
        "8",
        "--gpus_per_node",
        "8",
        "--",
        "--config",
        "sdxl",
        "out=gs://b/r",
    ]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    request = yaml.safe_load(proc.stdout.split("=== SCHEDULER REQUEST ===", 1)[1])
    assert request["apiVersion"].startswith("batch.volcano.sh/") and request["kind"] == "Job"
    assert request["spec"]["queue"] == "default" and len(request["spec"]["tasks"]) == 2  # one task per node
    # .torchxconfig's namespace and service account are the ones k8s/ creates
    from helpers.k8s import rendered

    objects = rendered("standalone")
    account = next(o for o in objects if o["kind"] == "ServiceAccount")
    from torchx.runner import config

    cfg: dict = {}
    config.apply(scheduler="kubernetes", cfg=cfg, dirs=[str(tmp_path)])  # what torchx submits with
    assert cfg["namespace"] == account["metadata"]["namespace"] == "kubeflow"
    pod = request["spec"]["tasks"][0]["template"]["spec"]
    assert pod["serviceAccountName"] == account["metadata"]["name"] == "distar-trainer"
