"""Prompts for training: curated Parquet shards, a deterministic global order, a per-rank share of every batch.

The order is a function of (seed, epoch) only: epoch e visits the prompts in the permutation randperm(N, seed, e),
and the global sample counter k (saved in every checkpoint) says where the run is. Global batch b covers samples
[b·G, (b+1)·G) with G = world_size × batch_size; rank r takes its contiguous slice. The data position is
therefore independent of the process count: a run resumed on another number of GPUs reads the same prompts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from distar import storage
from distar.errors import UserError

SHAPE_KEY = b"distar.embedding_shapes"


@dataclass
class PromptBatch:
    prompts: list[str]
    indices: list[int]
    embeddings: list[torch.Tensor] | None = None
    """Precomputed text embeddings, one tensor per column of the backbone's `embedding_columns` (SDXL: the
    (B, 77, D) prompt embeddings and the (B, P) pooled ones)."""


def _parquet_files(uri: str) -> tuple[object, list[str]]:
    from distar.prompts import split_files

    fs, path = storage.filesystem(uri)
    curated = split_files(uri, "train") if fs.exists(path) else None
    if curated is not None:  # a set written by `distar curate`: its train split, as its manifest lists it
        return fs, [storage.filesystem(f)[1] for f in curated]
    if not fs.exists(path):
        raise UserError(f"data.prompts {uri!r} does not exist; run `distar curate` or point it at Parquet shards")
    if fs.isdir(path) and any(fs.exists(f"{path.rstrip('/')}/{part}") for part in ("train", "eval", "stats.json")):
        raise UserError(
            f"data.prompts {uri!r} is a curated set without its manifest.json: its curation did not finish, so its "
            f"shards may be partial. Run `distar curate` again for it (the manifest is written last)"
        )
    parent = path.rstrip("/").rsplit("/", 1)[0]
    if parent != path.rstrip("/") and any(fs.exists(f"{parent}/{m}") for m in ("stats.json", "manifest.json")):
        raise UserError(
            f"data.prompts {uri!r} is inside a curated set ({parent}): name the set itself, whose manifest says "
            f"which shards are complete"
        )
    files = sorted(fs.find(path)) if fs.isdir(path) else [path]
    files = [f for f in files if f.endswith(".parquet")]
    if not files:
        raise UserError(f"data.prompts {uri!r} holds no .parquet files")
    return fs, files


class PromptSet:
    """Every prompt of the shards under `uri` (sorted by path), with precomputed embeddings when every shard has
    the `embedding_columns` (a backbone's)."""

    def __init__(
        self,
        uri: str,
        column: str = "prompt",
        use_embeddings: bool = True,
        embedding_columns: tuple[str, ...] = ("prompt_embeds", "pooled_prompt_embeds"),
    ):
        import pyarrow as pa
        import pyarrow.parquet as pq

        fs, files = _parquet_files(uri)
        prompts, shapes = [], None
        embeds: dict[str, list[np.ndarray]] = {name: [] for name in embedding_columns}
        for f in files:
            with fs.open(f, "rb") as fh:
                table = pq.read_table(fh)
            if column not in table.column_names:
                raise UserError(
                    f"{f!r} has no column {column!r} (columns: {', '.join(table.column_names)}); set data.prompt_column"
                )
            prompts.append(table.column(column).cast(pa.string()))
            has_embeds = all(name in table.column_names for name in embedding_columns)
            if use_embeddings and has_embeds:
                meta = json.loads((table.schema.metadata or {}).get(SHAPE_KEY, b"{}"))
                shapes = shapes or meta
                for name in embedding_columns:
                    embeds[name].append(_fixed_rows(table.column(name)))
        self.prompts = pa.chunked_array(prompts).combine_chunks()
        if self.prompts.null_count:
            raise UserError(f"data.prompts {uri!r}: {self.prompts.null_count} prompts are null; curate the set first")
        self.size = len(self.prompts)
        if self.size == 0:
            raise UserError(f"data.prompts {uri!r} holds no prompts")
        self.embeddings: list[np.ndarray] | None = None
        if embedding_columns and all(len(parts) == len(files) for parts in embeds.values()):
            self.embeddings = [
                np.concatenate(embeds[name]).reshape(self.size, *shapes[name]) for name in embedding_columns
            ]
        self._epoch, self._order = -1, None

    def __len__(self) -> int:
        return self.size

    @property
    def has_embeddings(self) -> bool:
        return self.embeddings is not None

    def order(self, epoch: int, seed: int, shuffle: bool = True) -> np.ndarray:
        if self._epoch != epoch:
            if shuffle:
                g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
                self._order = torch.randperm(self.size, generator=g).numpy()
            else:
                self._order = np.arange(self.size)
            self._epoch = epoch
        return self._order

    def indices(self, start: int, count: int, seed: int, shuffle: bool = True) -> list[int]:
        """Indices of global samples start … start+count−1 (crossing epochs where needed)."""
        out = []
        for k in range(start, start + count):
            epoch, pos = divmod(k, self.size)
            out.append(int(self.order(epoch, seed, shuffle)[pos]))
        return out

    def batch(self, samples_seen: int, rank: int, world_size: int, batch_size: int, seed: int, shuffle=True):
        """This rank's share of the global batch that starts at global sample `samples_seen`."""
        idx = self.indices(samples_seen + rank * batch_size, batch_size, seed, shuffle)
        batch = PromptBatch([self.prompts[i].as_py() for i in idx], idx)
        if self.embeddings is not None:
            batch.embeddings = [torch.from_numpy(np.ascontiguousarray(e[idx])) for e in self.embeddings]
        return batch


def _fixed_rows(column) -> np.ndarray:
    """A fixed-size-list (or list) column of floats → a (rows, width) array without a Python loop."""
    import pyarrow as pa

    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(column), -1)


def write_embedding_shard(
    uri: str,
    prompts: list[str],
    embeddings: dict[str, torch.Tensor],
    dtype: str = "float16",
    extra: dict | None = None,
) -> None:
    """One Parquet shard of prompts with their text embeddings, a column each (the layout PromptSet reads)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    np_dtype = {"float16": np.float16, "float32": np.float32}[dtype]
    columns = {"prompt": pa.array(prompts, pa.string())}
    shapes = {}
    for name, tensor in embeddings.items():
        e = tensor.detach().float().cpu().numpy().astype(np_dtype)
        columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(e.reshape(-1)), int(np.prod(e.shape[1:])))
        shapes[name] = list(e.shape[1:])
    columns.update({k: pa.array(v) for k, v in (extra or {}).items()})
    shapes = json.dumps(shapes)
    table = pa.table(columns).replace_schema_metadata({SHAPE_KEY: shapes.encode()})
    fs, path = storage.filesystem(uri)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as fh:
        pq.write_table(table, fh)
