"""Where model weights come from: a hub id, a local directory, or an fsspec URI; optionally via the model cache.

Every loader in distar resolves its source here to a local directory laid out like a hub repository,
then reads it with the library's own `from_pretrained`.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch

from distar import storage
from distar.errors import UserError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def default_download_root() -> Path:
    return Path(os.environ.get("DISTAR_DOWNLOAD_DIR", Path.home() / ".cache" / "distar" / "downloads"))


def resolve_model_dir(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    allow_patterns: Iterable[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    offline: bool | None = None,
) -> Path:
    """A local directory holding `source`'s files.

    source: a local directory, an fsspec URI (file://, s3://, gs://, hf://), or a hub id ("org/name").
    cache_dir: a model cache (local or URI) written by `distar cache`; when its manifest holds the source, the
    files are verified against it and used, and the hub is not contacted.
    offline (default: HF_HUB_OFFLINE): never contact the hub.
    """
    source = str(source)
    if offline is None:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if cache_dir is not None and HUB_ID.match(source):
        from distar.cache import lookup

        cached = lookup(str(cache_dir), source)
        if cached is not None:
            return cached
        if offline:
            raise UserError(
                f"{source!r} is not in the model cache {str(cache_dir)!r} and offline mode is on; "
                f"run `distar cache` for it first"
            )
    if storage.is_uri(source):
        if source.startswith("file://"):
            local = Path(source[len("file://") :])
            if local.is_dir():
                return local
        digest = hashlib.sha256(source.encode()).hexdigest()[:16]
        return storage.download_dir(source, default_download_root() / digest)
    if Path(source).expanduser().exists():
        return Path(source).expanduser()
    if HUB_ID.match(source):
        if offline:
            raise UserError(f"{source!r} is neither a local directory nor cached, and offline mode is on")
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(source, revision=revision, allow_patterns=list(allow_patterns or []) or None))
        except Exception as err:  # the hub client raises many types; all mean "could not fetch"
            raise UserError(f"could not fetch {source!r} from the hub: {err}") from err
    raise UserError(f"model source {source!r} is not a directory, a URI or a hub id (org/name)")


def require_files(root: Path, groups: dict[str, list[list[str]]]) -> None:
    """Check that `root` holds, for each component, at least one file of every alternative list.

    groups: {component: [[alternative paths for requirement 1], …]}. One error lists everything missing.
    """
    missing = []
    for component, requirements in groups.items():
        for alternatives in requirements:
            if not any((root / a).is_file() for a in alternatives):
                missing.append(f"{component}: {' or '.join(alternatives)}")
    if missing:
        raise UserError(
            f"model directory {str(root)!r} is missing {len(missing)} file(s):\n  - " + "\n  - ".join(missing)
        )


def resolve_file(spec: str | os.PathLike, **resolve_kwargs) -> Path:
    """A single file given as a local path, an fsspec URI, or 'org/name:filename' on the hub."""
    spec = str(spec)
    if Path(spec).is_file():
        return Path(spec)
    if "://" not in spec and ":" in spec:
        repo, filename = spec.split(":", 1)
        path = resolve_model_dir(repo, allow_patterns=[filename], **resolve_kwargs) / filename
    else:
        parent, _, filename = spec.rpartition("/")
        path = resolve_model_dir(parent, **resolve_kwargs) / filename
    if not path.is_file():
        raise UserError(f"file {spec!r} not found (looked at {path})")
    return path


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch pickle (weights only; a {"state_dict": …} wrapper is unwrapped)."""
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(9)
    # safetensors: an 8-byte header length, then the JSON header; decided by content, not by the file's name
    if path.suffix == ".safetensors" or head[8:9] == b"{":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a file that is not a checkpoint
        raise UserError(f"cannot read {str(path)!r} as a PyTorch state dict: {err}") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{str(path)!r} holds a {type(state).__name__}, not a state dict")
    return state
