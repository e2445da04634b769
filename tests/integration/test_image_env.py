"""The CPU image's Python environment, built here the way containers/Dockerfile.cpu builds it (its lock, then the
project without resolving anything again) in a scratch venv, and the CPU steps' smoke commands run inside it. The
image itself needs a container engine; what goes into it does not."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _dockerfile_runs() -> list[str]:
    text = (ROOT / "containers" / "Dockerfile.cpu").read_text().replace("\\\n", " ")
    return [line.strip()[4:] for line in text.splitlines() if line.strip().startswith("RUN ")]


def _torch_index_reachable(url: str) -> bool:
    try:
        socket.create_connection((urlparse(url).hostname, 443), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def image_env(tmp_path_factory):
    venv = tmp_path_factory.mktemp("image") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    index = re.search(r"^ARG TORCH_INDEX=(\S+)$", (ROOT / "containers/Dockerfile.cpu").read_text(), re.M).group(1)
    # PyTorch's index where it can be reached; otherwise pip's own configuration must hold torch's CPU build
    extra = ["--extra-index-url", index] if _torch_index_reachable(index) else []
    subprocess.run([*pip, *extra, "-r", str(ROOT / "locks/cpu.txt")], check=True)
    subprocess.run([*pip, "--no-deps", str(ROOT)], check=True)
    return venv


def test_the_lock_is_complete_and_the_images_own_check_passes(image_env):
    python = str(image_env / "bin" / "python")
    check = subprocess.run([python, "-m", "pip", "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    (imports,) = [r for r in _dockerfile_runs() if "python -c" in r]
    code = shlex.split(imports.split("&& python -c", 1)[1])[0]
    subprocess.run([python, "-c", code], check=True)
    frozen = subprocess.run([python, "-m", "pip", "freeze"], capture_output=True, text=True, check=True).stdout
    assert re.search(r"^torch==\S+\+cpu$", frozen, re.M), "the CPU image must carry torch's CPU build"


def test_the_cpu_steps_run_in_the_image_env(image_env, tmp_path):
    distar = str(image_env / "bin" / "distar")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def run(*args):
        proc = subprocess.run([distar, *args], capture_output=True, text=True, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    tsv = str(ROOT / "tests/data/PartiPrompts.tsv")
    run("curate", "--source", tsv, "--out", str(tmp_path / "prompts"), "--tokenizer", "tiny:sdxl")
    assert json.loads((tmp_path / "prompts/manifest.json").read_text())
    cache = str(tmp_path / "cache")
    run("cache", "--models", "stabilityai/stable-diffusion-xl-base-1.0=tiny:sdxl", "--out", cache, "--offline")
    run("cache", "--out", cache, "--verify", "--models", "stabilityai/stable-diffusion-xl-base-1.0=tiny:sdxl")
    job = yaml.safe_load(
        run(
            "trainjob",
            "render",
            "--image",
            "img",
            "--name",
            "distar-x",
            "--namespace",
            "ns",
            "out=s3://b/run",
            "data.prompts=s3://b/p",
            "model.cache_dir=s3://b/c",
        )
    )
    # the command the TrainJob's pods run, parsed by the image's own torchrun
    command = job["spec"]["trainer"]["command"]
    assert command[0] == "torchrun"
    parse = "import sys; from torch.distributed.run import get_args_parser; get_args_parser().parse_args(sys.argv[1:])"
    proc = subprocess.run(
        [str(image_env / "bin" / "python"), "-c", parse, *command[1:]], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
