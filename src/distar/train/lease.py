"""One writer per run: a lease file under the run's output URI, {out}/LEASE.json.

Rank 0 creates it before training (host, pid, holder id, start time, heartbeat) with an exclusive create: O_EXCL on
local disks, `If-None-Match: *` on S3, `ifGenerationMatch=0` on GCS (fsspec's mode="create"). Of two trainers that
start together, one create succeeds and the other is refused. On object stores without conditional writes
(MinIO before 2024, other S3-compatible stores) the create degrades to write-then-read-back: two trainers starting
within the same second can both believe they hold it; one started later is still refused.

The holder id is the host and torchrun's run id (the same across torchrun's restarts of the workers), or the pid
without torchrun: a restarted worker group takes its own lease back. The heartbeat is renewed at every log step;
a lease whose heartbeat is older than `lease.stale_minutes` belongs to a run that died, and is taken over only
when asked (`lease.take_over=true`). A finished or preempted run releases it.
"""

from __future__ import annotations

import json
import os
import socket
import time

from distar import storage
from distar.errors import UserError

LEASE = "LEASE.json"


class LeaseHeldError(UserError):
    """Another trainer writes to this output."""


def holder_id() -> str:
    return f"{socket.gethostname()}/{os.environ.get('TORCHELASTIC_RUN_ID') or os.getpid()}"


class Lease:
    def __init__(self, out_uri: str, stale_minutes: float = 30.0, take_over: bool = False):
        self.fs, root = storage.filesystem(out_uri)
        self.path = f"{root.rstrip('/')}/{LEASE}"
        self.uri = f"{str(out_uri).rstrip('/')}/{LEASE}"
        self.stale_s, self.take_over = stale_minutes * 60.0, take_over
        self.record = {"holder": holder_id(), "host": socket.gethostname(), "pid": os.getpid(),
                       "started": time.time(), "heartbeat": time.time()}  # fmt: skip

    def _read(self) -> dict | None:
        self.fs.invalidate_cache()
        try:
            return json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {"holder": "unknown (unreadable lease)", "heartbeat": 0.0}

    def acquire(self) -> None:
        """Hold the lease or raise LeaseHeldError naming the holder and what to do."""
        self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
        current = self._read()
        if current is not None and current.get("holder") != self.record["holder"]:
            age = time.time() - float(current.get("heartbeat", 0.0))
            who = (f"{current.get('holder')} (pid {current.get('pid')}, started "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(current.get('started', 0)))} UTC, "
                   f"last heartbeat {age / 60:.1f} min ago)")  # fmt: skip
            if age < self.stale_s:
                raise LeaseHeldError(
                    f"{self.uri} is held by another trainer, {who}: two runs must not write one output. "
                    f"Stop that run, or choose another out="
                )
            if not self.take_over:
                raise LeaseHeldError(
                    f"{self.uri} is held by {who}, which looks dead (no heartbeat for more than "
                    f"{self.stale_s / 60:g} min). If it is, rerun with lease.take_over=true"
                )
            self.fs.rm(self.path)
            current = None
        if current is None:
            try:
                self.fs.pipe_file(self.path, json.dumps(self.record).encode(), mode="create")
            except FileExistsError:
                raise LeaseHeldError(
                    f"{self.uri} was created by another trainer a moment ago; choose another out="
                ) from None
            except (NotImplementedError, TypeError, ValueError):  # a filesystem without exclusive create
                self._write()
            if (self._read() or {}).get("holder") != self.record["holder"]:
                raise LeaseHeldError(f"{self.uri} was taken by another trainer a moment ago; choose another out=")
        else:
            self._write()  # our own lease, from before a restart of the worker group

    def _write(self) -> None:
        storage.write_json(self.fs, self.path, self.record, indent=None)

    def heartbeat(self) -> None:
        self.record["heartbeat"] = time.time()
        self._write()

    def release(self) -> None:
        if (self._read() or {}).get("holder") == self.record["holder"]:
            self.fs.rm(self.path)
