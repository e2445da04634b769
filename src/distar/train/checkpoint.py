"""Sharded, resumable checkpoints on any fsspec URI (local, gs://, s3://) with torch.distributed.checkpoint.

Layout of {out}/checkpoints/step_00001000/:
  .metadata, __R_0.distcp        DCP shards: generator, assistant, their optimizers, EMA (any process count reads them)
  rank/rank_00000.pt …           each process's RNG states
  trainer_state.json             step, global sample position, counters, world size
  config.json                    the resolved config
  COMPLETE                       written last, after every process has finished writing
A directory without COMPLETE is never loaded: it is an interrupted save, deleted before that step is saved again.
Older complete checkpoints beyond keep_last are deleted only after a newer one is complete.
"""

from __future__ import annotations

import io
import json
import re
import time
import warnings
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

from distar import storage
from distar.train.distributed import World

MARKER = "COMPLETE"
STEP_DIR = re.compile(r"step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


class Checkpointer:
    def __init__(self, out_uri: str, world: World, keep_last: int = 3):
        self.root = str(out_uri).rstrip("/") + "/checkpoints"
        self.fs, self.path = storage.filesystem(self.root)
        self.world = world
        self.keep_last = keep_last

    def uri(self, step: int) -> str:
        return f"{self.root}/{step_dir_name(step)}"

    def _dirs(self) -> dict[int, str]:
        self.fs.invalidate_cache()
        if not self.fs.exists(self.path):
            return {}
        found = {}
        for entry in self.fs.ls(self.path, detail=False):
            m = STEP_DIR.search(entry.rstrip("/"))
            if m:
                found[int(m.group(1))] = entry.rstrip("/")
        return found

    def complete_steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        return sorted(s for s, d in self._dirs().items() if self.fs.exists(f"{d}/{MARKER}"))

    def latest(self) -> int | None:
        steps = self.complete_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: dict[str, Any], rank_state: dict[str, Any], trainer_state: dict,
             config: dict) -> str:  # fmt: skip
        """Collective: every process calls it with its shards of `state` and its own `rank_state`."""
        uri = self.uri(step)
        _, path = storage.filesystem(uri)
        if self.world.is_main and self.fs.exists(path):
            self.fs.rm(path, recursive=True)  # an interrupted save of this step, or a stale one from a longer run
        self.world.barrier()
        dcp.save(state, storage_writer=FsspecWriter(uri))
        buf = io.BytesIO()
        torch.save(rank_state, buf)
        self.fs.makedirs(f"{path}/rank", exist_ok=True)
        self.fs.pipe_file(f"{path}/rank/rank_{self.world.rank:05d}.pt", buf.getvalue())
        if self.world.is_main:
            self.fs.pipe_file(f"{path}/trainer_state.json", json.dumps(trainer_state, indent=2).encode())
            self.fs.pipe_file(f"{path}/config.json", json.dumps(config, indent=2).encode())
        self.world.barrier()
        if self.world.is_main:
            marker = {"step": step, "world_size": self.world.size, "time": time.time()}
            self.fs.pipe_file(f"{path}/{MARKER}", json.dumps(marker).encode())
            self._prune()
        self.world.barrier()
        return uri

    def _prune(self) -> None:
        complete = self.complete_steps()
        dirs = self._dirs()
        for step in complete[: -self.keep_last]:
            self.fs.rm(dirs[step], recursive=True)

    def load(self, step: int, state: dict[str, Any]) -> tuple[dict, dict | None]:
        """Fill `state` in place from checkpoint `step`; returns (trainer_state, this rank's rank_state or None
        when the checkpoint was written by fewer processes)."""
        uri = self.uri(step)
        _, path = storage.filesystem(uri)
        if not self.fs.exists(f"{path}/{MARKER}"):
            raise RuntimeError(f"checkpoint {uri} is not complete (no {MARKER}); refusing to load it")
        dcp.load(state, storage_reader=FsspecReader(uri))
        trainer_state = json.loads(self.fs.cat_file(f"{path}/trainer_state.json"))
        rank_file = f"{path}/rank/rank_{self.world.rank:05d}.pt"
        rank_state = None
        if self.fs.exists(rank_file):
            rank_state = torch.load(io.BytesIO(self.fs.cat_file(rank_file)), weights_only=False)
        return trainer_state, rank_state


def read_config(checkpoint_uri: str) -> dict:
    fs, path = storage.filesystem(checkpoint_uri)
    return json.loads(fs.cat_file(f"{path.rstrip('/')}/config.json"))


def load_unet_weights(checkpoint_uri: str, network: str = "generator") -> dict[str, torch.Tensor]:
    """One network's full weights from a checkpoint written by any number of processes, in one process
    (no process group needed): diffusers UNet keys → tensors."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FsspecReader(checkpoint_uri)
    metadata = reader.read_metadata()
    prefix = f"{network}."
    state = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    if not state:
        raise RuntimeError(f"checkpoint {checkpoint_uri} holds no {network!r} weights")
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=FsspecReader(checkpoint_uri), no_dist=True)
    return {k[len(prefix) :]: v for k, v in state.items()}
