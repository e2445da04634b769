"""Sharded, resumable checkpoints on any fsspec URI (local, gs://, s3://) with torch.distributed.checkpoint.

Layout of {out}/checkpoints/step_00001000/:
  .metadata, __R_0.distcp        DCP shards: generator, assistant, their optimizers, EMA (any process count reads them)
  rank/rank_00000.pt …           each process's RNG states (tensors and numbers only: read with weights_only)
  trainer_state.json             step, global sample position, counters, world size
  config.json                    the resolved config
  COMPLETE                       written last, after every process has finished writing: the step, the world size
                                 and the size and sha256 of every other file of the checkpoint
A directory without COMPLETE is never loaded: it is an interrupted save, deleted before that step is saved again.
Older complete checkpoints beyond keep_last are deleted only after a newer one is complete.

Nothing read from a checkpoint can run code: every file is checked against COMPLETE's sha256 before anything is
parsed (`verify`: a flipped byte, a truncated or a missing file is named and the checkpoint refused), DCP's pickled
.metadata is read by an unpickler that admits only DCP's own metadata classes (`SafeFsspecReader`), DCP's
non-tensor items are read with torch.load(weights_only=True) (`SafeLoadPlanner`), and the RNG files hold tensors
and numbers only (weights_only too). A checkpoint whose COMPLETE lists no files is refused.

What is saved is a `TrainState`: the Stateful parts DCP shards (each network's weights and optimizer state, the
EMA), the counters (JSON) and each rank's random-number state.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import random
import re
import time
import warnings

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.stateful import Stateful

from distar import readers, storage
from distar.errors import UserError
from distar.train import parallel
from distar.train.distributed import World


class CheckpointError(UserError):
    """A checkpoint that is corrupt, incomplete, or holds something that would have to execute code to load."""


# DCP's metadata is a pickle of these classes (torch.distributed.checkpoint.metadata and filesystem); the restricted
# unpickler admits them and nothing else, so a planted .metadata cannot name a callable such as os.system.
_DCP = "torch.distributed.checkpoint"
_METADATA_GLOBALS = {
    (f"{_DCP}.metadata", name)
    for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                 "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {(f"{_DCP}.filesystem", "_StorageInfo"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
     ("collections", "OrderedDict")}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a DCP checkpoint's metadata")


class SafeFsspecReader(FsspecReader):
    """DCP's fsspec reader with a metadata unpickler that cannot execute code."""

    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as fh:
            try:
                metadata = _MetadataUnpickler(fh).load()
            except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as err:
                raise CheckpointError(f"{self.path}: .metadata is not a DCP checkpoint's metadata ({err})") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{self.path}: .metadata holds a {type(metadata).__name__}, not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner with the non-tensor items (optimizer hyper-parameters) read as weights only."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            raise CheckpointError(f"checkpoint item {read_item.dest_index.fqn!r} is not plain data ({err})") from None
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner itself uses

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class ModelState(Stateful):
    """A network's weights as DCP shards them (FSDP2 DTensors or plain tensors). `trainable_only`: only the
    weights that train (a LoRA network's adapters: the frozen base, its buffers included, is loaded from its
    source; SD3.5-Medium's position table alone is 0.9 GB)."""

    def __init__(self, module: nn.Module, trainable_only: bool = False):
        self.module, self.trainable_only = module, trainable_only

    def _options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(ignore_frozen_params=True, strict=False) if self.trainable_only else None

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(self.module, options=self._options())
        if self.trainable_only:  # torch keeps buffers beside the trained weights; these are the frozen base's
            buffers = {parallel.param_name(name) for name, _ in self.module.named_buffers()}
            state = {k: v for k, v in state.items() if k not in buffers}
        return state

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.module, state, options=self._options())


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
        """The counters, each checked against the type and domain of the one it replaces (a forged
        trainer_state.json would otherwise fail later, inside the loop)."""
        where = "trainer_state.json"
        for key, now in self.counters.items():
            if key not in state:
                continue
            if isinstance(now, dict):
                value = state[key]
                if not isinstance(value, dict) or set(value) != set(now):
                    raise CheckpointError(f"{where}: {key!r} is {str(value)[:80]}, not a table of {sorted(now)}")
                for name in now:
                    readers.integer(value, name, f"{where}, {key}")
            else:
                readers.integer(state, key, where)
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
BEST = "BEST"
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
        try:
            dcp.save(dict(train_state.parts), storage_writer=FsspecWriter(uri))
        except CheckpointException as err:  # a BaseException wrapping each rank's error (and its traceback)
            cause = next(iter(err.failures.values()), (err,))[0]
            named = storage.user_error(cause) if isinstance(cause, Exception) else None
            reason = str(cause).strip().splitlines()[-1][:200] if str(cause).strip() else type(cause).__name__
            raise named or UserError(
                f"checkpoint {uri} could not be written ({reason}): a short write means the output is full or over a "
                "quota or size limit. The earlier complete checkpoints stay; free space and rerun to resume"
            ) from None
        buf = io.BytesIO()
        torch.save(train_state.rank_state(), buf)
        written = {f"rank/rank_{self.world.rank:05d}.pt": buf.getvalue()}
        if self.world.is_main:
            written["trainer_state.json"] = json.dumps(train_state.trainer_state(), indent=2).encode()
            written["config.json"] = json.dumps(config, indent=2).encode()
        self.fs.makedirs(f"{path}/rank", exist_ok=True)
        for rel, data in written.items():
            self.fs.pipe_file(f"{path}/{rel}", data)
        self.world.barrier()
        # Each rank hashes what it wrote: its DCP shards (read back: DCP writes them), its own small files (from
        # memory); rank 0 also the DCP metadata. COMPLETE then lists every file of the directory.
        mine = {rel: _digest(data) for rel, data in written.items()}
        listed = self._files(path)
        own = [f for f in listed if f.startswith(f"__{self.world.rank}_") or (self.world.is_main and f == ".metadata")]
        mine.update({rel: self._hash(f"{path}/{rel}") for rel in own})
        files = {rel: entry for part in self.world.gather(mine) for rel, entry in part.items()}
        if self.world.is_main:
            unlisted = sorted(set(listed) - set(files))
            if unlisted:
                raise RuntimeError(f"checkpoint {uri}: files no process wrote: {unlisted}")
            marker = {"step": step, "world_size": self.world.size, "time": time.time(), "files": files}
            storage.write_json(self.fs, f"{path}/{MARKER}", marker)
            self._prune()
        self.world.barrier()
        return uri

    def _files(self, path: str) -> list[str]:
        """Every file under a checkpoint directory, relative to it (the marker excepted)."""
        self.fs.invalidate_cache()
        found = []
        for full in self.fs.find(path):
            rel = full[len(path.rstrip("/")) + 1 :] if full.startswith(path.rstrip("/") + "/") else full
            if rel != MARKER:
                found.append(rel)
        return sorted(found)

    def _hash(self, full: str) -> dict:
        size, digest = storage.hash_file(self.fs, full)
        return {"size": size, "sha256": digest}

    def marker(self, step: int) -> dict:
        """The COMPLETE record of checkpoint `step`."""
        _, path = storage.filesystem(self.uri(step))
        where = f"checkpoint {self.uri(step)}: {MARKER}"
        try:
            marker = readers.read_mapping(self.fs, f"{path}/{MARKER}", where)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {self.uri(step)} is not complete (no {MARKER})") from None
        except UserError as err:
            raise CheckpointError(str(err)) from None
        files = marker.get("files")
        if not isinstance(files, dict) or not files:
            raise CheckpointError(f"{where} lists no files, so nothing in it can be verified")
        for rel, want in files.items():
            if not readers.confined(rel) or rel == MARKER:
                raise CheckpointError(f"{where} names {rel!r}, which is no file inside the checkpoint")
            if not isinstance(want, dict):
                raise CheckpointError(f"{where}: the record of {rel!r} is not an object")
        return marker

    def verify(self, step: int) -> dict:
        """Check every file of checkpoint `step` against COMPLETE (size, then sha256) before anything is parsed;
        the files are shared out over the ranks, and every rank raises the same CheckpointError naming each bad
        file. Returns the marker."""
        uri = self.uri(step)
        _, path = storage.filesystem(uri)
        marker = self.marker(step)
        files = marker["files"]
        problems = []
        for i, (rel, want) in enumerate(sorted(files.items())):
            if i % self.world.size != self.world.rank:
                continue
            full = f"{path}/{rel}"
            if not self.fs.exists(full):
                problems.append(f"{rel}: missing")
                continue
            if storage.is_local(self.fs) and readers.leaves(path, rel):
                problems.append(f"{rel}: a link that leads outside the checkpoint")
                continue
            size = self.fs.size(full)
            if size != want.get("size"):
                problems.append(f"{rel}: {size} bytes, {MARKER} says {want.get('size')} (truncated or replaced)")
            elif self._hash(full)["sha256"] != want.get("sha256"):
                problems.append(f"{rel}: sha256 differs from {MARKER} (corrupt or replaced)")
        problems = sorted(p for part in self.world.gather(problems) for p in part)
        if problems:
            raise CheckpointError(f"checkpoint {uri} does not verify:\n  - " + "\n  - ".join(problems))
        return marker

    def _prune(self) -> None:
        complete = self.complete_steps()
        dirs = self._dirs()
        best = self.best()
        for step in complete[: -self.keep_last]:
            if step != best:  # the best checkpoint (guardrails) outlives keep_last
                self.fs.rm(dirs[step], recursive=True)

    def mark_best(self, step: int) -> None:
        """Record `step` as the run's best checkpoint (the newest written while every guard held)."""
        if self.world.is_main:
            storage.write_json(self.fs, f"{self.path}/{BEST}", {"step": step, "time": time.time()})

    def best(self) -> int | None:
        self.fs.invalidate_cache()
        try:
            return readers.integer(readers.read_mapping(self.fs, f"{self.path}/{BEST}"), "step", BEST)
        except (FileNotFoundError, UserError):
            return None  # a damaged BEST names no checkpoint: pruning then keeps only the newest ones

    def load(self, step: int, train_state: TrainState) -> dict:
        """Verify checkpoint `step`, then fill `train_state` in place from it (this rank's random-number state too,
        when the checkpoint was written by at least as many processes); returns its trainer_state.json."""
        uri = self.uri(step)
        files = self.verify(step)["files"]
        try:
            return self._load_verified(uri, files, train_state)
        except CheckpointError:
            raise
        except (Exception, CheckpointException) as err:  # verified against a forged COMPLETE: whatever, fall back
            reason = str(err).strip().splitlines()[-1][:300] if str(err).strip() else ""
            raise CheckpointError(
                f"checkpoint {uri} verifies but cannot be loaded ({type(err).__name__}: {reason})"
            ) from err

    def _load_verified(self, uri: str, files: dict, train_state: TrainState) -> dict:
        _, path = storage.filesystem(uri)
        dcp.load(dict(train_state.parts), storage_reader=SafeFsspecReader(uri), planner=SafeLoadPlanner())
        trainer_state = readers.read_mapping(self.fs, f"{path}/trainer_state.json", f"checkpoint {uri}: trainer_state")
        train_state.load_trainer_state(trainer_state)
        rank_file = f"rank/rank_{self.world.rank:05d}.pt"
        if rank_file in files:
            try:
                rank_state = torch.load(io.BytesIO(self.fs.cat_file(f"{path}/{rank_file}")), weights_only=True)
            except pickle.UnpicklingError as err:
                raise CheckpointError(f"checkpoint {uri}: {rank_file} is not plain data ({err})") from None
            train_state.load_rank_state(rank_state)
        return trainer_state


def _digest(data: bytes) -> dict:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def verify_checkpoint(checkpoint_uri: str) -> dict:
    """`Checkpointer.verify` of one checkpoint directory, in one process (export); returns its marker."""
    uri = checkpoint_uri.rstrip("/")
    root, _, name = uri.rpartition("/")
    m = STEP_DIR.search(name)
    if not root.endswith("/checkpoints") or m is None:
        raise CheckpointError(f"{checkpoint_uri!r} is not a checkpoint directory (…/checkpoints/step_NNNNNNNN)")
    return Checkpointer(root[: -len("/checkpoints")], World(0, 0, 1, torch.device("cpu"))).verify(int(m.group(1)))


def read_config(checkpoint_uri: str) -> dict:
    fs, path = storage.filesystem(checkpoint_uri)
    return readers.read_mapping(fs, f"{path.rstrip('/')}/config.json", f"{checkpoint_uri}/config.json")


def load_unet_weights(checkpoint_uri: str, network: str = "generator") -> dict[str, torch.Tensor]:
    """One network's full weights from a checkpoint written by any number of processes, in one process
    (no process group needed): diffusers UNet keys → tensors."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = SafeFsspecReader(checkpoint_uri)
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
        dcp.load(state, storage_reader=SafeFsspecReader(checkpoint_uri), planner=SafeLoadPlanner(), no_dist=True)
    return {k[len(prefix) :]: v for k, v in state.items()}
