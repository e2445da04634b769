"""One writer per run: a lease file under the run's output URI, {out}/LEASE.json.

Rank 0 creates it before training (host, pid, holder id, start time, heartbeat) with an exclusive create: O_EXCL on
local disks, `If-None-Match: *` on S3, `ifGenerationMatch=0` on GCS (fsspec's mode="create"). Of two trainers that
start together, one create succeeds and the other is refused. On object stores without conditional writes
(MinIO before 2024, other S3-compatible stores) the create degrades to write-then-read-back: two trainers starting
within the same second can both believe they hold it; one started later is still refused.

The holder id is the host and torchrun's run id (the same across torchrun's restarts of the workers), or the pid
without torchrun: a restarted worker group takes its own lease back.

The holder reads the lease back before every checkpoint, log line and report (`check`) and stops, exit 75 with
nothing more written, once it names another holder: a trainer that was paused (SIGSTOP, a frozen node) while
another took over never writes into that run again.

Whether a holder is dead is judged without comparing clocks across hosts: on the holder's own host, by its pid (a
dead pid is stale at once, and the lease is taken over); elsewhere, by watching its heartbeat counter: the first
refusal notes the counter on this host's clock (in the local state directory), and a counter that has not moved
for `lease.stale_minutes` of this host's time marks the run as dead. Taking over is always the user's call
(`lease.take_over=true`); the previous holder, if it was alive after all, stops at its next check.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path

from distar import readers, storage
from distar.errors import UserError
from distar.stop import Preempted

LEASE = "LEASE.json"


class LeaseHeldError(UserError):
    """Another trainer writes to this output."""


class LeaseLost(Preempted):
    """Another trainer took this run's lease over: this one stops writing (exit 75)."""


def holder_id() -> str:
    return f"{socket.gethostname()}/{os.environ.get('TORCHELASTIC_RUN_ID') or os.getpid()}"


def _alive(pid: int) -> bool:
    """Whether process `pid` on this host runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def state_dir() -> Path:
    """This host's record of the leases it has watched ($DISTAR_STATE_DIR, else ~/.cache/distar/leases)."""
    return Path(os.environ.get("DISTAR_STATE_DIR") or Path.home() / ".cache" / "distar" / "leases")


class Lease:
    def __init__(self, out_uri: str, stale_minutes: float = 30.0, take_over: bool = False):
        self.fs, root = storage.filesystem(out_uri)
        self.path = f"{root.rstrip('/')}/{LEASE}"
        self.uri = f"{str(out_uri).rstrip('/')}/{LEASE}"
        self.stale_s, self.take_over = stale_minutes * 60.0, take_over
        self.record = {"holder": holder_id(), "host": socket.gethostname(), "pid": os.getpid(),
                       "started": time.time(), "heartbeat": time.time(), "beats": 0}  # fmt: skip

    def _read(self) -> dict | None:
        """The lease as written, its fields typed; None when there is none. A lease that does not parse is held
        by an unknown trainer (its heartbeat cannot be watched), which only take_over replaces."""
        self.fs.invalidate_cache()
        fix = "if no trainer writes this run, rerun with lease.take_over=true"
        try:
            record = readers.read_mapping(self.fs, self.path, self.uri, fix, limit=1 << 16)
            record.setdefault("beats", 0)
            for key, kind in (("holder", readers.text), ("host", readers.text), ("pid", readers.integer),
                              ("heartbeat", readers.number), ("beats", readers.integer)):  # fmt: skip
                kind(record, key, self.uri, fix)
        except FileNotFoundError:
            return None
        except UserError as err:
            return {"holder": f"unknown ({err})", "host": "", "pid": 0, "beats": 0, "unreadable": True}
        return record

    def _describe(self, current: dict, watched_s: float | None) -> str:
        if current.get("unreadable"):
            return current["holder"]
        started = current.get("started")
        started = started if isinstance(started, int | float) and 0 <= started < 1e11 else 0.0  # shown only
        seen = "" if watched_s is None else f", heartbeat unchanged for {watched_s / 60:.1f} min on this host"
        return (f"{current['holder']} (pid {current['pid']} on {current['host']}, started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(started))} UTC{seen})")  # fmt: skip

    def _watched(self, current: dict) -> float:
        """For how long (this host's clock) the holder's heartbeat has been seen unchanged; 0 on first sight."""
        where = state_dir() / f"{hashlib.sha256(self.uri.encode()).hexdigest()[:16]}.json"
        beat = [current["holder"], current["beats"], current.get("heartbeat")]
        now = time.time()
        try:
            seen = json.loads(where.read_text())
            if seen.get("beat") == beat and isinstance(seen.get("since"), float) and seen["since"] <= now:
                return now - seen["since"]
        except (OSError, ValueError, AttributeError):
            pass
        try:
            where.parent.mkdir(parents=True, exist_ok=True)
            where.write_text(json.dumps({"uri": self.uri, "beat": beat, "since": now}))
        except OSError:
            pass  # an unwritable state directory: every sight is a first one, so only take_over takes over
        return 0.0

    def acquire(self) -> None:
        """Hold the lease or raise LeaseHeldError naming the holder and the way out."""
        self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
        current = self._read()
        if current is not None and current.get("holder") != self.record["holder"]:
            dead_here = current.get("host") == self.record["host"] and current["pid"] > 0 and not _alive(current["pid"])
            if not (dead_here or self.take_over):
                watched = None if current.get("unreadable") else self._watched(current)
                who = self._describe(current, watched)
                if watched is not None and watched >= self.stale_s:
                    raise LeaseHeldError(
                        f"{self.uri} is held by {who}, which looks dead. If it is, rerun with lease.take_over=true"
                    )
                raise LeaseHeldError(
                    f"{self.uri} is held by another trainer, {who}: two runs must not write one output. Stop that "
                    f"run, or choose another out=. If it is dead (its node is gone), rerun with lease.take_over=true: "
                    f"should it still run, it stops at its next log step without writing more"
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

    def check(self) -> None:
        """Raise LeaseLost unless the lease still names this trainer: called before each write into the run."""
        current = self._read()
        if (current or {}).get("holder") != self.record["holder"]:
            holder = (current or {}).get("holder", "nobody (the lease file is gone)")
            raise LeaseLost(
                f"{self.uri} now names {holder}, not this trainer: another run took this output over, so this one "
                f"stops without writing more (its last complete checkpoint stays)"
            )

    def heartbeat(self) -> None:
        """Renew the heartbeat (after a `check`): the counter is what other hosts watch."""
        self.record["heartbeat"] = time.time()
        self.record["beats"] += 1
        self._write()

    def release(self) -> None:
        if (self._read() or {}).get("holder") == self.record["holder"]:
            self.fs.rm(self.path)
