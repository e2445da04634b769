"""torchrun for the launchers on this machine (`distar train --nproc-per-node`, the local pipeline), with the exit
code a preempted run has without torchrun: 75 when every worker that stopped exited 75 (each after a complete
checkpoint), or when torchrun itself was stopped by SIGTERM/SIGINT (it forwards the signal and waits up to
--shutdown-timeout for the workers' checkpoint). Stock torchrun reports both as a failure, exit 1."""

from __future__ import annotations

import sys

from distar.stop import PREEMPTED


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import run
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        run.main(argv)
    except ChildFailedError as err:
        codes = sorted({failure.exitcode for failure in err.failures.values()})
        if codes != [PREEMPTED]:
            raise
        print(f"distar train: every worker stopped with exit {PREEMPTED} (preempted after a complete checkpoint); "
              "rerun the same command to resume", file=sys.stderr)  # fmt: skip
    except SignalException as err:
        print(f"distar train: stopped by {err.sigval.name}; rerun the same command to resume", file=sys.stderr)
    else:
        return 0
    return PREEMPTED


if __name__ == "__main__":
    sys.exit(main())
