"""Launching the trainer from a pipeline step: torchrun as a subprocess on the step's own machine.

On a cluster the multi-node path is a Kubeflow Trainer TrainJob whose pods run the same torchrun command.
"""

from __future__ import annotations

import os
import subprocess
import sys

from distar.errors import UserError


def torchrun_command(config: str, overrides: list[str], nproc_per_node: int = 1, max_restarts: int = 0) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc_per_node),
        "--max-restarts", str(max_restarts), "-m", "distar.train", "--config", config, *overrides,
    ]  # fmt: skip


def run_local(config: str, overrides: list[str], nproc_per_node: int = 1, max_restarts: int = 0) -> dict:
    """Run torchrun and return the run's summary.json; the training log streams to this process's output."""
    import json

    from distar import storage
    from distar.train.config import load_config

    resolved = load_config(config, overrides)  # a bad key fails here, before any process starts
    cmd = torchrun_command(config, overrides, nproc_per_node, max_restarts)
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=os.environ.copy())
    if proc.returncode != 0:
        raise UserError(f"training failed (torchrun exit code {proc.returncode}); its log is above")
    fs, path = storage.filesystem(resolved.out)
    return json.loads(fs.cat_file(f"{path.rstrip('/')}/summary.json"))
