"""Sharded, resumable checkpoints on any fsspec URI (local, gs://, s3://) with torch.distributed.checkpoint.

Layout of {out}/checkpoints/step_00001000/:
  .metadata, __R_0.distcp        DCP shards: generator, assistant, their optimizers, EMA (any process count reads them)
  rank/rank_00000.pt …           each process's RNG states (tensors and numbers only: read with weights_only)
  trainer_state.json             step, global sample position, counters, world size
  config.json                    the resolved config
  COMPLETE                       written last, after every process has finished writing
A directory without COMPLETE is never loaded: it is an interrupted save, deleted before that step is saved again.
Older complete checkpoints beyond keep_last are deleted only after a newer one is complete.

What is saved is a `TrainState`: the Stateful parts DCP shards (each network's weights and optimizer state, the
EMA), the counters (JSON) and each rank's random-number state.
"""

from __future__ import annotations

import io
import json
import random
import re
import time
import warnings

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.stateful import Stateful

from distar import storage
from distar.train.distributed import World


class ModelState(Stateful):
    """A network's weights as DCP shards them (FSDP2 DTensors or plain tensors)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.module)

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.module, state)


class OptimizerState(Stateful):
    """An optimizer's state keyed by parameter names, so any process count can read it."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer):
        self.module, self.optimizer = module, optimizer

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.module, self.optimizer)

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.module, self.optimizer, state)


class TensorsState(Stateful):
    """A dict of tensors (the EMA) loaded in place."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def state_dict(self) -> dict:
        return self.tensors

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            if value is not self.tensors[name]:
                self.tensors[name].copy_(value)


class TrainState:
    """The whole resumable state of a run, owned here rather than assembled by the loop.

    parts: the Stateful objects DCP saves under their names (generator, assistant, generator_optim,
    assistant_optim, ema). counters: step, samples_seen, skipped (written as JSON by rank 0).
    """

    def __init__(self, parts: dict[str, Stateful], counters: dict, world_size: int, config_digest: str):
        self.parts, self.counters = parts, counters
        self.world_size, self.config_digest = world_size, config_digest

    def trainer_state(self) -> dict:
        return {**self.counters, "world_size": self.world_size, "config_digest": self.config_digest}

    def load_trainer_state(self, state: dict) -> None:
        self.counters.update({k: state[k] for k in self.counters if k in state})

    @staticmethod
    def rank_state() -> dict:
        """This process's random-number states as tensors and plain numbers (loadable with weights_only)."""
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        version, internal, gauss_next = random.getstate()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": {
                "kind": kind,
                "keys": torch.from_numpy(keys.astype(np.int64)),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached),
            },
            "python": {
                "version": version,
                "internal": torch.tensor(internal, dtype=torch.int64),
                "gauss_next": gauss_next,
            },
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    @staticmethod
    def load_rank_state(state: dict) -> None:
        torch.set_rng_state(state["torch"])
        n = state["numpy"]
        keys = n["keys"].numpy().astype(np.uint32)
        np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
        p = state["python"]
        random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


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

    def save(self, step: int, train_state: TrainState, config: dict) -> str:
        """Collective: every process calls it with its own shards and random-number state."""
        uri = self.uri(step)
        _, path = storage.filesystem(uri)
        if self.world.is_main and self.fs.exists(path):
            self.fs.rm(path, recursive=True)  # an interrupted save of this step, or a stale one from a longer run
        self.world.barrier()
        dcp.save(dict(train_state.parts), storage_writer=FsspecWriter(uri))
        buf = io.BytesIO()
        torch.save(train_state.rank_state(), buf)
        self.fs.makedirs(f"{path}/rank", exist_ok=True)
        self.fs.pipe_file(f"{path}/rank/rank_{self.world.rank:05d}.pt", buf.getvalue())
        if self.world.is_main:
            storage.write_json(self.fs, f"{path}/trainer_state.json", train_state.trainer_state())
            storage.write_json(self.fs, f"{path}/config.json", config)
        self.world.barrier()
        if self.world.is_main:
            marker = {"step": step, "world_size": self.world.size, "time": time.time()}
            storage.write_json(self.fs, f"{path}/{MARKER}", marker, indent=None)
            self._prune()
        self.world.barrier()
        return uri

    def _prune(self) -> None:
        complete = self.complete_steps()
        dirs = self._dirs()
        for step in complete[: -self.keep_last]:
            self.fs.rm(dirs[step], recursive=True)

    def load(self, step: int, train_state: TrainState) -> dict:
        """Fill `train_state` in place from checkpoint `step` (this rank's random-number state too, when the
        checkpoint was written by at least as many processes); returns the checkpoint's trainer_state.json."""
        uri = self.uri(step)
        _, path = storage.filesystem(uri)
        if not self.fs.exists(f"{path}/{MARKER}"):
            raise RuntimeError(f"checkpoint {uri} is not complete (no {MARKER}); refusing to load it")
        dcp.load(dict(train_state.parts), storage_reader=FsspecReader(uri))
        trainer_state = json.loads(self.fs.cat_file(f"{path}/trainer_state.json"))
        train_state.load_trainer_state(trainer_state)
        rank_file = f"{path}/rank/rank_{self.world.rank:05d}.pt"
        if self.fs.exists(rank_file):
            train_state.load_rank_state(torch.load(io.BytesIO(self.fs.cat_file(rank_file)), weights_only=True))
        return trainer_state


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
