"""One process, one measurement: the peak of live tensor bytes in a few training iterations, the CPU's counterpart
of torch.cuda.max_memory_allocated, for `distar plan`'s check (benchmarks/run.py runs it in a fresh process).

Every storage that an operation creates is counted from its creation to its release (a dispatch mode sees the
operations, a finaliser the release); what exists before the first iteration (weights, buffers) is counted by
walking the networks. The peak resident set of the process is reported beside it.

    python benchmarks/memory_probe.py ARCH PRESET [key=value ...]  → JSON on stdout
"""

from __future__ import annotations

import json
import sys
import tempfile
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
import anatomy  # noqa: E402

from distar.models.architectures import ARCHITECTURES  # noqa: E402
from distar.train import distributed  # noqa: E402


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the storages created under this mode and not yet freed, and their peak."""

    def __init__(self, existing: dict[int, int]):
        super().__init__()
        self.live = dict(existing)
        self.current = self.peak = sum(existing.values())

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)
        return out


def _existing(trainer) -> dict[int, int]:
    nets = trainer.nets
    modules = [nets.generator, nets.assistant, nets.reference, nets.vae, nets.reward, nets.prompt_encoder]
    out = {}
    for module in modules:
        if module is None:
            continue
        for t in [*module.parameters(), *module.buffers()]:
            out[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return out


def _vm_hwm() -> int:
    """Peak resident bytes since the last reset (Linux /proc/self/status, in kB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main(arch: str, preset: str, overrides: list[str], iterations: int = 3) -> dict:
    torch.manual_seed(0)
    world = distributed.init("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = anatomy.build_trainer(ARCHITECTURES[arch](), preset, overrides, Path(tmp), world=world)
        mode = LiveTensorBytes(_existing(trainer))
        with mode:
            for _ in range(iterations):
                trainer.train_step()
    return {"tensor_peak_bytes": mode.peak, "measured_bytes": mode.peak, "peak_rss": _vm_hwm()}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], sys.argv[3:])))
