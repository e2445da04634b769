"""The trainer under torchrun with 2 CPU processes (gloo): exact resume, a worker killed with SIGKILL, FSDP2 with
activation checkpointing launched from Kubeflow Trainer's PET_* variables, and the learning signal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.tiny import tiny

from distar.train.checkpoint import MARKER, load_unet_weights

pytestmark = pytest.mark.slow

COMMON = ["log.progress=false", "log.tensorboard=false", "checkpoint.every=2", "checkpoint.keep_last=5"]


def torchrun(out: Path, *overrides: str, flags=("--nproc_per_node", "2"), env=None, timeout=600):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        *flags,
        "-m",
        "distar.train",
        "--config",
        "tiny",
        f"out={out}",
        *COMMON,
        *overrides,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def checkpoint(out: Path, step: int) -> str:
    path = out / "checkpoints" / f"step_{step:08d}"
    assert (path / MARKER).is_file(), f"no complete checkpoint at {path}"
    return str(path)


def assert_same_weights(a: str, b: str, atol=1e-6):
    for network in ("generator", "assistant"):
        wa, wb = load_unet_weights(a, network), load_unet_weights(b, network)
        assert wa.keys() == wb.keys() and len(wa) > 100
        worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
        assert worst <= atol, f"{network} differs by {worst}"


def initial_weights(network: str) -> dict[str, torch.Tensor]:
    from distar.backbones.sdxl import load_unet
    from distar.sources import read_state_dict

    if network == "generator":
        return read_state_dict(tiny("tiny:dmd2_unet.safetensors"))
    return load_unet(tiny("tiny:sdxl")).state_dict()


def assert_same_training(a: str, b: str, rtol=0.05):
    """The weight updates of two runs agree, ‖Δa − Δb‖ ≤ rtol ‖Δb‖, for runs whose gradients are reduced in
    another order (FSDP reduce-scatter vs DDP all-reduce): Adam's first steps move every parameter by about
    ±lr, so a sign that float noise flips for a near-zero gradient rules out an element-wise tolerance."""
    for network in ("generator", "assistant"):
        init = initial_weights(network)
        wa, wb = load_unet_weights(a, network), load_unet_weights(b, network)
        assert wa.keys() == wb.keys() == init.keys()
        diff = sum(((wa[k] - wb[k]).double() ** 2).sum() for k in init).sqrt()
        update = sum(((wb[k] - init[k]).double() ** 2).sum() for k in init).sqrt()
        assert update > 0 and diff <= rtol * update, f"{network}: ‖Δa − Δb‖ = {diff:.3g}, ‖Δb‖ = {update:.3g}"


def metrics(out: Path) -> dict[int, dict]:
    lines = [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    return {x["step"]: x for x in lines if "loss/generator" in x}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """6 steps, 2 processes, DDP, never stopped: what every interrupted run must end with."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    torchrun(out, "steps=6")
    return out


def test_resumed_run_ends_with_the_weights_of_the_uninterrupted_one(uninterrupted, tmp_path):
    out = tmp_path / "run"
    torchrun(out, "steps=3")  # stops after step 3 (checkpoints at 2 and 3)
    second = torchrun(out, "steps=6")
    assert "resuming from" in second.stdout and "step_00000003" in second.stdout
    assert_same_weights(checkpoint(out, 6), checkpoint(uninterrupted, 6))
    a, b = metrics(uninterrupted), metrics(out)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):  # the same prompts and noise after the resume
        assert b[step]["loss/generator"] == pytest.approx(a[step]["loss/generator"], rel=1e-5)


def test_worker_killed_with_sigkill_restarts_from_the_last_complete_checkpoint(uninterrupted, tmp_path):
    import psutil

    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "--max-restarts",
        "1",
        "-m",
        "distar.train",
        "--config",
        "tiny",
        f"out={out}",
        *COMMON,
        "steps=6",
    ]
    agent = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = None
    deadline = time.time() + 300
    while killed is None and time.time() < deadline and agent.poll() is None:
        if (out / "checkpoints" / "step_00000002" / MARKER).exists():
            for child in psutil.Process(agent.pid).children(recursive=True):
                try:
                    if child.environ().get("RANK") == "1" and "distar.train" in " ".join(child.cmdline()):
                        os.kill(child.pid, signal.SIGKILL)
                        killed = child.pid
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
        time.sleep(0.02)
    stdout, stderr = agent.communicate(timeout=600)
    assert killed is not None, "the worker finished before it could be killed"
    assert agent.returncode == 0, stderr[-5000:]
    assert stdout.count("starting fresh") == 1 and stdout.count("resuming from") == 1, stdout
    assert "Signals.SIGKILL" in stderr or "SIGKILL" in stderr or "exitcode: -9" in stderr
    assert_same_weights(checkpoint(out, 6), checkpoint(uninterrupted, 6))


def test_fsdp2_with_activation_checkpointing_from_pet_variables_matches_ddp(uninterrupted, tmp_path):
    out = tmp_path / "fsdp"
    # Kubeflow Trainer's torch-distributed runtime passes the topology as PET_* variables, not flags.
    pet = {"PET_NNODES": "1", "PET_NPROC_PER_NODE": "2", "PET_NODE_RANK": "0"}
    torchrun(out, "steps=2", "parallel.strategy=fsdp", "parallel.activation_checkpointing=true", flags=(), env=pet)
    assert_same_training(checkpoint(out, 2), checkpoint(uninterrupted, 2))
    # The sharded checkpoint is read back by DDP processes (DCP reshards) and training goes on.
    torchrun(out, "steps=4", "parallel.strategy=ddp")
    assert_same_training(checkpoint(out, 4), checkpoint(uninterrupted, 4))


def test_reward_rises_with_alpha_rew_through_training(tmp_path):
    runs = {}
    for alpha in (0, 1000):  # on the paper's PickScore scale (the cosine): 1000 · cos
        out = tmp_path / f"alpha{alpha}"
        torchrun(out, "steps=20", f"loss.alpha_rew={alpha}", "log.sample_every=20")
        lines = [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
        runs[alpha] = {"first": metrics(out)[1]["reward"], "eval": [x for x in lines if "eval/reward" in x][-1]}
    # Same seed, same start: the first step's reward (before any update) is the same in both runs ...
    assert runs[1000]["first"] == pytest.approx(runs[0]["first"], rel=1e-6)
    # ... and after 20 updates the generator trained with the reward scores clearly higher on the fixed samples.
    gain = runs[1000]["eval"]["eval/reward"] - runs[0]["eval"]["eval/reward"]
    assert gain > 0.001, runs  # 0.1 of the raw logit_scale·cos
