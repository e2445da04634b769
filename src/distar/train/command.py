"""The one torchrun command over `python -m distar.train`, for each of its launchers: `distar train
--nproc-per-node` and the local pipeline (torchrun of this Python, on this machine) and the TrainJob (the image's
`torchrun`, nodes and processes set by the torch-distributed runtime's PET_* variables)."""

from __future__ import annotations

import sys

# Seconds torchrun waits after forwarding SIGTERM before it kills the workers: longer than the SDXL checkpoint
# (docs/TRAINING.md, "Guarantees under faults"); a pod gets a minute more before the kubelet kills it.
SHUTDOWN_TIMEOUT_S = 600


def torchrun_command(
    config: str,
    overrides: list[str],
    nproc_per_node: int | None = 1,
    max_restarts: int | None = 0,
    standalone: bool = False,
    program: list[str] | None = None,
) -> list[str]:
    """torchrun (`program`; default: this Python's distar.train.torchrun, torchrun with exit 75 for a preempted
    run) with distar's shutdown timeout, then
    `-m distar.train --config CONFIG OVERRIDES…`. `nproc_per_node` and `max_restarts` None: left to torchrun and
    its environment (a TrainJob's runtime sets them)."""
    return [
        *(program or [sys.executable, "-m", "distar.train.torchrun"]),
        *(["--standalone"] if standalone else []),
        "--shutdown-timeout",
        str(SHUTDOWN_TIMEOUT_S),
        *(["--nproc_per_node", str(nproc_per_node)] if nproc_per_node is not None else []),
        *(["--max-restarts", str(max_restarts)] if max_restarts is not None else []),
        "-m",
        "distar.train",
        "--config",
        config,
        *overrides,
    ]
