"""torchrun for the launchers on this machine (`distar train --nproc-per-node`, the local pipeline), with the exit
codes a run has without torchrun: 2 when the first worker to stop refused its input (rank 0 printed the one
message), 75 when every worker that stopped exited 75 (each after a complete checkpoint), or when torchrun itself
was stopped by SIGTERM/SIGINT (it forwards the signal and waits up to --shutdown-timeout for the workers'
checkpoint). Stock torchrun reports each as a failure, exit 1, with a report of every worker."""

from __future__ import annotations

import sys

from distar.stop import PREEMPTED

USAGE = 2  # a UserError: bad input, one message from rank 0


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import run
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    _quiet_expected_exits()
    try:
        run.main(argv)
    except ChildFailedError as err:
        codes = sorted({failure.exitcode for failure in err.failures.values()})
        if err.get_first_failure()[1].exitcode == USAGE:  # the input was refused (the others were stopped after)
            return USAGE
        if codes != [PREEMPTED]:
            raise
        print(f"distar train: every worker stopped with exit {PREEMPTED} (preempted after a complete checkpoint); "
              "rerun the same command to resume", file=sys.stderr)  # fmt: skip
    except SignalException as err:
        print(f"distar train: stopped by {err.sigval.name}; rerun the same command to resume", file=sys.stderr)
    else:
        return 0
    return PREEMPTED


def _quiet_expected_exits() -> None:
    """torchrun logs every worker's non-zero exit as an error, and its OMP_NUM_THREADS banner on every start: for
    the exits that are answers (2: refused input, said once by rank 0; 75: preempted) those lines are noise."""
    import logging

    class Expected(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            text = record.getMessage()
            answer = f"(exitcode: {USAGE})" in text or f"(exitcode: {PREEMPTED})" in text
            noise = "OMP_NUM_THREADS" in text or set(text.strip()) == {"*"} or "closing signal" in text
            return not (answer or noise)

    for name in ("torch.distributed.run", "torch.distributed.elastic.multiprocessing.api"):
        logging.getLogger(name).addFilter(Expected())


if __name__ == "__main__":
    sys.exit(main())
