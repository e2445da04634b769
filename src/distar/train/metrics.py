"""Rank 0's record of a run: metrics.jsonl and TensorBoard events under {out}/logs, sample grids under {out}/samples.

Local outputs are written in place. For object storage the logs are written to a local staging directory and
uploaded at every checkpoint and at the end (object stores cannot append). On resume from step s, lines of a
later step (written after the checkpoint the run resumed from) are dropped, and TensorBoard purges them too.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import torch

from distar import storage


class MetricLogger:
    def __init__(self, out_uri: str, enabled: bool, tensorboard: bool, resume_step: int = 0):
        self.enabled = enabled
        self.out = str(out_uri).rstrip("/")
        self.fs, self.path = storage.filesystem(self.out)
        self.remote = storage.is_uri(self.out) and not self.out.startswith("file://")
        self.local = Path(tempfile.mkdtemp(prefix="distar-logs-")) if self.remote else Path(self.path)
        self.writer = None
        if not enabled:
            return
        (self.local / "logs").mkdir(parents=True, exist_ok=True)
        self.jsonl = self.local / "logs" / "metrics.jsonl"
        if self.remote and self.fs.exists(f"{self.path}/logs/metrics.jsonl"):
            self.fs.get(f"{self.path}/logs/metrics.jsonl", str(self.jsonl))
        if self.jsonl.exists():  # keep what the checkpoint we resume from had seen
            kept = [line for line in self.jsonl.read_text().splitlines() if _step(line) <= resume_step]
            self.jsonl.write_text("".join(line + "\n" for line in kept))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.local / "logs" / "tensorboard"), purge_step=resume_step + 1)

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        # `time` (seconds since the epoch) lets the report give the run's wall time; it is not a scalar of TensorBoard
        record = {"step": step, "time": round(time.time(), 3)}
        record.update({k: (v if math.isfinite(v) else str(v)) for k, v in values.items()})
        with self.jsonl.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def images(self, step: int, grid: torch.Tensor) -> None:
        """A (3, H, W) grid in [0, 1] → samples/step_XXXXXXXX.png (and TensorBoard)."""
        if not self.enabled:
            return
        from PIL import Image

        array = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        name = f"samples/step_{step:08d}.png"
        (self.local / "samples").mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(self.local / name)
        if self.writer is not None:
            self.writer.add_image("samples", grid.clamp(0, 1), step)

    def flush(self) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            self.writer.flush()
        if self.remote:
            self.fs.put(str(self.local) + "/", self.path, recursive=True)

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()


def _step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62


def image_grid(images: torch.Tensor, columns: int | None = None) -> torch.Tensor:
    """(B, 3, H, W) → (3, rows·H, columns·W)."""
    b, c, h, w = images.shape
    columns = columns or math.ceil(math.sqrt(b))
    rows = math.ceil(b / columns)
    grid = torch.zeros(c, rows * h, columns * w, dtype=images.dtype)
    for i in range(b):
        r, col = divmod(i, columns)
        grid[:, r * h : (r + 1) * h, col * w : (col + 1) * w] = images[i].cpu()
    return grid
