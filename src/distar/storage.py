"""Artifacts are URIs (file://, gs://, s3://, hf://, plain paths) handled through fsspec.

Only where a library needs a local path do we download, explicitly, into a directory we name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import fsspec

from distar.errors import UserError


def is_uri(source: str) -> bool:
    return "://" in str(source)


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of a URI and the path inside it; a missing protocol package is a UserError."""
    try:
        fs, path = fsspec.core.url_to_fs(str(uri))
    except (ImportError, ValueError) as err:
        raise UserError(
            f"cannot open {uri!r}: {err}. Install the filesystem package for its scheme "
            "(gcsfs for gs://, s3fs for s3://) or pass a local path."
        ) from err
    return fs, path


COMPLETE_MARKER = ".distar-download-complete"


def download_dir(uri: str, dest: str | os.PathLike) -> Path:
    """Copy the tree under `uri` into the local directory `dest` (created); returns `dest`.

    A marker written after the last file makes a finished copy reusable: every part of a model loaded from
    the same URI (UNet, encoders, VAE) reads one download, and an interrupted copy is fetched again.
    """
    dest = Path(dest)
    if (dest / COMPLETE_MARKER).is_file():
        return dest
    fs, path = filesystem(uri)
    if not fs.exists(path):
        raise UserError(f"{uri!r} does not exist")
    dest.mkdir(parents=True, exist_ok=True)
    if fs.isdir(path):
        fs.get(path.rstrip("/") + "/", str(dest), recursive=True)
    else:
        fs.get(path, str(dest / Path(path).name))
    (dest / COMPLETE_MARKER).write_text(uri)
    return dest


def write_json(fs: fsspec.AbstractFileSystem, path: str, value, indent: int | None = 2) -> None:
    """`value` as JSON at `path` on `fs`, in one write (a reader sees the whole file or none of it on object stores)."""
    fs.pipe_file(path, json.dumps(value, indent=indent).encode())
