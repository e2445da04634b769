"""Artifacts are URIs (file://, gs://, s3://, hf://, plain paths) handled through fsspec.

Only where a library needs a local path do we download, explicitly, into a directory we name.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import fsspec

from distar.errors import UserError
from distar.readers import check_out_path


def is_uri(source: str) -> bool:
    return "://" in str(source)


OBJECT_STORES = ("gs://", "s3://")


def check_shared(what: str, uri: str, local_ok: bool = False) -> None:
    """`uri` is read or written by other pods (training nodes, later steps): object storage, or, where everything
    runs on this machine (`local_ok`), a local path. KFP's default root, minio://…, and http(s):// are neither:
    fsspec cannot write them, and a training node would find out only after its GPUs were allocated."""
    uri = str(uri)
    if uri.startswith(OBJECT_STORES) or (local_ok and not is_uri(uri)):
        return
    if uri.startswith("minio://"):
        fix = (
            "KFP's default pipeline root (minio://) reaches no step: give the run one on gs://BUCKET/… or "
            "s3://BUCKET/… (distar submit --pipeline-root)"
        )
    elif local_ok:
        fix = "use gs://BUCKET/…, s3://BUCKET/… or a local path"
    else:
        fix = "use gs://BUCKET/… or s3://BUCKET/…, which every node and step can reach"
    raise UserError(
        f"{what} {uri!r}: other pods read it, so it must be object storage; {fix} (docs/CLUSTER.md, 'Roots')"
    )


# Keys of the storage secret (k8s/base/secrets.yaml): on GCS, or on S3 with IRSA, they stay blank, and a blank
# variable would win over the credential chain (botocore reads an empty AWS_ACCESS_KEY_ID as a key).
BLANK_MEANS_UNSET = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN")


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of a URI and the path inside it; a missing protocol package is a UserError."""
    for name in BLANK_MEANS_UNSET:
        if os.environ.get(name) == "":
            del os.environ[name]
    try:
        fs, path = fsspec.core.url_to_fs(str(uri))
    except (ImportError, ValueError) as err:
        raise UserError(
            f"cannot open {uri!r}: {err}. Install the filesystem package for its scheme "
            "(gcsfs for gs://, s3fs for s3://) or pass a local path."
        ) from err
    endpoint = _endpoint(str(uri))
    if endpoint is not None:
        _check_reachable(*endpoint, uri=str(uri))
    return fs, path


CONNECT_TIMEOUT_S = 5.0
_REACHED: set[tuple[str, int]] = set()


def _endpoint(uri: str) -> tuple[str, int] | None:
    """The host and port an object-store URI is served from (emulators included), or None for other schemes."""
    from urllib.parse import urlparse

    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme in ("gs", "gcs"):
        url = os.environ.get("STORAGE_EMULATOR_HOST") or "https://storage.googleapis.com"
    elif scheme in ("s3", "s3a"):
        url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "https://s3.amazonaws.com"
    else:
        return None
    parsed = urlparse(url if "://" in url else f"http://{url}")
    return parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)


def _check_reachable(host: str, port: int, uri: str) -> None:
    """One TCP connect per endpoint and process, bounded by CONNECT_TIMEOUT_S: the storage clients retry a dead
    endpoint with backoff for most of a minute before they fail."""
    import socket

    if (host, port) in _REACHED:
        return
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise UserError(
            f"cannot reach {host}:{port} for {uri!r} within {CONNECT_TIMEOUT_S:g} s ({err}): check the network, "
            "or AWS_ENDPOINT_URL / STORAGE_EMULATOR_HOST"
        ) from None
    _REACHED.add((host, port))


COMPLETE_MARKER = ".distar-download-complete"


def download_dir(uri: str, dest: str | os.PathLike, allow_patterns: Iterable[str] | None = None) -> Path:
    """Copy the tree under `uri` into the local directory `dest` (created); returns `dest`.

    A marker written after the last file makes a finished copy reusable: every part of a model loaded from
    the same URI (UNet, encoders, VAE) reads one download, and an interrupted copy is fetched again.
    allow_patterns: only the files whose path under `uri` matches one (fnmatch), as the hub's downloads take them.
    """
    dest = Path(dest)
    if (dest / COMPLETE_MARKER).is_file():
        return dest
    fs, path = filesystem(uri)
    if not fs.exists(path):
        raise UserError(f"{uri!r} does not exist")
    dest.mkdir(parents=True, exist_ok=True)
    if fs.isdir(path) and allow_patterns:
        import fnmatch

        path = path.rstrip("/")
        for found in fs.find(path):
            rel = found[len(path) + 1 :]
            if any(fnmatch.fnmatch(rel, pattern) for pattern in allow_patterns):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                fs.get(found, str(dest / rel))
    elif fs.isdir(path):
        fs.get(path.rstrip("/") + "/", str(dest), recursive=True)
    else:
        fs.get(path, str(dest / Path(path).name))
    (dest / COMPLETE_MARKER).write_text(uri)
    return dest


def hash_file(fs: fsspec.AbstractFileSystem, path: str) -> tuple[int, str]:
    """(size, sha256 hex digest) of the file at `path` on `fs`, read in 4 MiB chunks."""
    import hashlib

    h, size = hashlib.sha256(), 0
    with fs.open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def task_uri(runs_root: str, run_id: str, task_name: str, variant: str = "") -> str:
    """Where a pipeline task writes under `runs_root`: {runs_root}/{run id}/{task name}[-{variant}], the same for
    every retry of the task (which resumes or rewrites there)."""
    return f"{runs_root.rstrip('/')}/{run_id}/{task_name}" + (f"-{variant}" if variant else "")


def link(uri: str) -> str:
    """What a terminal shows for an output: a local path as a file:// URL (a click opens it), a URI as it is."""
    if is_uri(uri):
        return uri
    return Path(uri).resolve().as_uri()


def is_root(uri: str) -> bool:
    """Whether an output URI names no directory of its own: empty, ".", "~", "/", or a bare scheme (s3://,
    file:///). Writing a run or an export there would scatter files among others."""
    import re

    text = str(uri).strip()
    if text in ("", ".", "./", "~", "~/") or re.fullmatch(r"[A-Za-z][\w+.-]*:/*", text):
        return True
    return (text.split("://", 1)[1] if "://" in text else text).strip("/") == ""


RUN_MARKS = ("LEASE.json", "logs/metrics.jsonl", "checkpoints")
"""What a directory that holds a distar run has (from its first step on): its lease, its log, its checkpoints."""


def check_run_out(uri: str, force: bool = False) -> None:
    """Refuse a training output that is inside another run (below a directory holding a run or a checkpoint, as
    `RUN/checkpoints/step_…` is: that run's pruning would delete it) or that is a non-empty directory holding no
    run (the user's files there would be overwritten), unless `force`."""
    fs, path = filesystem(uri)
    fs.invalidate_cache()
    path = path.rstrip("/")
    parts = path.split("/")
    for i in range(len(parts) - 1, 0, -1):
        parent = "/".join(parts[:i])
        if not parent.strip("/"):
            break
        mark = next((m for m in (*RUN_MARKS[:2], "COMPLETE") if fs.exists(f"{parent}/{m}")), None)
        if mark is not None:
            raise UserError(
                f"out={uri!r} is inside another run's directory ({parent} holds {mark}), whose checkpoint pruning "
                "or resume would delete or read it: choose an out= outside it"
            )
    if fs.exists(f"{path}/COMPLETE"):
        raise UserError(f"out={uri!r} is a checkpoint directory: choose an out= of its own")
    if force or not fs.isdir(path) or any(fs.exists(f"{path}/{m}") for m in RUN_MARKS):
        return
    found = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    if found:
        shown = ", ".join(sorted(found)[:5]) + (", …" if len(found) > 5 else "")
        raise UserError(
            f"out={uri!r} holds {len(found)} entries ({shown}) but no distar run: training would write over files "
            "there (config.json, report.html, summary.json). Choose an empty or new out=, or pass --force"
        )


def check_output(what: str, uri: str) -> None:
    """An output a user named: no control characters, and a directory of its own (not empty, `.`, `/`, a bare
    scheme), so that nothing is scattered among other files."""
    check_out_path(what, uri)
    if is_root(uri):
        raise UserError(f"{what} {uri!r} names no directory of its own: name one (e.g. prompts/parti or "
                        "gs://BUCKET/prompts/parti), so that nothing is written among other files")  # fmt: skip


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def put_file(fs: fsspec.AbstractFileSystem, source: str | os.PathLike, path: str, root: str) -> None:
    """Copy the local file `source` to `path` on `fs`, never writing outside `root`: on a local disk the copy is
    renamed over `path`, so a link there is replaced, not followed, and a directory that leads outside is refused."""
    if not is_local(fs):
        fs.put_file(str(source), path)
        return
    dest, top = Path(fs._strip_protocol(path)), Path(fs._strip_protocol(root)).resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.parent.resolve().is_relative_to(top):
        raise UserError(f"{dest}: its directory leads outside {top} (a link); remove the link and run again")
    _rename_into_place(dest, lambda partial: shutil.copyfile(source, partial))


def write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """`data` at `path` on `fs` so that a reader sees the whole file or none of it, even when the writer is killed
    midway: an object store's upload is one object; a local file is written beside and renamed over `path`."""
    if not is_local(fs):
        fs.pipe_file(path, data)
        return
    local = Path(fs._strip_protocol(path))
    local.parent.mkdir(parents=True, exist_ok=True)
    _rename_into_place(local, lambda partial: partial.write_bytes(data))


def _rename_into_place(dest: Path, fill) -> None:
    """`fill` writes a hidden file beside `dest`, which then replaces `dest` in one rename: a reader sees the old
    file or the new one, and a link at `dest` is replaced, not followed."""
    partial = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
    fill(partial)
    os.replace(partial, dest)


def write_json(fs: fsspec.AbstractFileSystem, path: str, value, indent: int | None = 2) -> None:
    """`value` as JSON at `path` on `fs`, whole or not at all (`write_bytes`)."""
    write_bytes(fs, path, json.dumps(value, indent=indent).encode())


def user_error(err: BaseException) -> UserError | None:
    """The one message for a storage failure a user causes (credentials, endpoints, permissions, full or read-only
    disks, missing files); None for anything else, which stays a bug with its traceback."""
    import errno

    name = type(err).__name__
    where = getattr(err, "filename", None) or ""
    where = f" ({where})" if where else ""
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return UserError(f"no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a profile, or the "
                         f"pod's role) for s3:// URIs ({err})")  # fmt: skip
    if name in ("DefaultCredentialsError", "RefreshError"):
        return UserError(f"no usable GCS credentials: set GOOGLE_APPLICATION_CREDENTIALS or run where Workload "
                         f"Identity is set up, for gs:// URIs ({err})")  # fmt: skip
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ServerTimeoutError",
                "ConnectionError", "ConnectTimeout", "TimeoutError"):  # fmt: skip
        return UserError(f"cannot reach the storage endpoint: {err}. Check the URI, the network and "
                         f"AWS_ENDPOINT_URL / STORAGE_EMULATOR_HOST")  # fmt: skip
    remote = getattr(err, "code", None) if name == "HttpError" else None  # gcsfs, after its retries
    if (isinstance(err, OSError) and err.errno == errno.EREMOTEIO) or (isinstance(remote, int) and remote >= 500):
        return UserError(f"the object store kept failing a request after every retry ({err}); each file distar "
                         "writes there is whole or absent: rerun the same command once the store recovers")  # fmt: skip
    if isinstance(err, OSError):
        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return UserError(f"no room to write ({errno.errorcode[err.errno]}: the disk or a quota is full, or a "
                             f"file is over a size limit){where}: free space there or write elsewhere")  # fmt: skip
        if err.errno == errno.EROFS:
            return UserError(f"the output is on a read-only filesystem{where}: choose a writable out / --out")
        if isinstance(err, PermissionError):
            return UserError(f"permission denied{where}: check the path's permissions, or the bucket's credentials "
                             f"and IAM role ({err})")  # fmt: skip
        if isinstance(err, IsADirectoryError):
            return UserError(f"a directory where a file is expected{where}")
        if isinstance(err, NotADirectoryError):
            return UserError(f"a file where a directory is expected{where}")
        if isinstance(err, FileNotFoundError):
            return UserError(f"not found{where or ': ' + str(err)}")
    return None
