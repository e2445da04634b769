"""One process, one measurement: the peak resident memory that a few training iterations add, for `distar plan`'s
check (run by benchmarks/run.py in a fresh process, so that the peak is this run's alone).

    python benchmarks/memory_probe.py ARCH PRESET [key=value ...]  → JSON on stdout
"""

from __future__ import annotations

import ctypes
import gc
import json
import sys
import tempfile
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import anatomy  # noqa: E402

from distar.models.architectures import ARCHITECTURES  # noqa: E402
from distar.train import distributed  # noqa: E402


def _vm_hwm() -> int:
    """Peak resident bytes since the last reset (Linux /proc/self/status, in kB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main(arch: str, preset: str, overrides: list[str]) -> dict:
    torch.manual_seed(0)
    world = distributed.init("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        # Imports and one-time initialisations (thread pools, kernels' caches) on the smallest networks first; the
        # heap they freed goes back to the system, so the measured run cannot reuse it unseen.
        anatomy.build_trainer(ARCHITECTURES["tiny"](), "tiny", ["parallel.strategy=none"], Path(tmp) / "warm",
                              world=world).train_step()  # fmt: skip
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        baseline = psutil.Process().memory_info().rss
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current resident size
        trainer = anatomy.build_trainer(ARCHITECTURES[arch](), preset, overrides, Path(tmp) / "run", world=world)
        for _ in range(3):
            trainer.train_step()
        peak = _vm_hwm()
    return {"baseline_rss": baseline, "peak_rss": peak, "measured_bytes": peak - baseline}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], sys.argv[3:])))
