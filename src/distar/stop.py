"""How a run stops: SIGTERM and SIGINT as a flag the loop reads (`StopSignals`), `Preempted` and its exit code,
and the one mapping from an error to an exit code and a message that both `main`s use (`distar` and
`python -m distar.train`). Training stops after a complete checkpoint, an evaluation after its last score shard."""

from __future__ import annotations

import signal
import sys
import threading

from distar.errors import UserError, redact

PREEMPTED = 75
"""The exit code of a run stopped by SIGTERM/SIGINT with its state saved (EX_TEMPFAIL: rerun resumes)."""


class Preempted(Exception):
    """SIGTERM or SIGINT stopped the run with its state saved (a complete checkpoint, the finished score shards);
    rerunning resumes from it."""


class StopSignals:
    """SIGTERM (what Kubernetes and Kueue send before killing a pod) and SIGINT set a flag instead of ending the
    process; the loop reads it after each step. The previous handlers come back on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def exit_code(err: BaseException, prog: str, quiet: bool = False) -> int:
    """The exit code for `err`, after one line on stderr (none when `quiet`): 75 for a preempted run, 2 for a
    user's mistake (a UserError, or a storage failure a user causes). Anything else is a bug: re-raised, with its
    traceback."""
    from distar import storage

    if isinstance(err, Preempted):
        if not quiet:
            print(f"{prog}: {err}", file=sys.stderr)
        return PREEMPTED
    translated = err if isinstance(err, UserError) else storage.user_error(err)
    if translated is None:
        raise err
    if not quiet:
        print(f"{prog}: error: {redact(translated)}", file=sys.stderr)
    return 2
