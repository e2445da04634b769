"""Progress where operators look: rank 0 reports progress, ETA and the main metrics into the TrainJob's
`status.trainerStatus` (Kubeflow Trainer ≥ 2.2 with the TrainJobStatus feature gate), through the kubeflow SDK's
`update_trainjob_status`.

The controller injects KUBEFLOW_TRAINER_SERVER_URL, _CA_CERT and _TOKEN into the trainer pods; without them (a
local run, a cluster without the gate) the reporter is off and costs nothing. A report that fails is logged once
and dropped: status is a view of the run, never a reason to stop it.
"""

from __future__ import annotations

import os
import sys
import time

SERVER_ENV = "KUBEFLOW_TRAINER_SERVER_URL"
# The metrics an operator reads first; the status allows 256 entries of 64 characters, so only these go there.
REPORTED = {
    "reward": "reward",
    "divergence": "divergence",
    "loss/generator": "loss_generator",
    "loss/assistant": "loss_assistant",
    "images_per_s": "images_per_s",
    "skipped/generator": "skipped_generator",
    "skipped/assistant": "skipped_assistant",
}
INTERVAL_S = 30.0
"""At most one report per this many seconds."""
SDK_FLOOR_S = 5.0
"""update_trainjob_status drops a report sent sooner than this after the previous one."""


def eta_seconds(step: int, total: int, first_step: int, elapsed_s: float) -> int | None:
    """Remaining time at the rate of the steps done in this process (a resumed run counts from its resume step)."""
    done = step - first_step
    if done <= 0 or elapsed_s <= 0:
        return None
    return max(0, round((total - step) * elapsed_s / done))


def status_metrics(values: dict) -> dict[str, str]:
    out = {}
    for key, name in REPORTED.items():
        if key in values:
            value = values[key]
            out[name] = f"{value:.6g}" if isinstance(value, float) else str(value)
    return out


class ProgressReporter:
    def __init__(self, total_steps: int, first_step: int, interval_s: float = INTERVAL_S, clock=time.monotonic):
        self.enabled = bool(os.environ.get(SERVER_ENV))
        self.total, self.first, self.clock = total_steps, first_step, clock
        self.interval_s = max(interval_s, SDK_FLOOR_S)
        self.started = clock()
        self.last_sent: float | None = None
        self._sent_at: float | None = None  # real time: the SDK's floor runs on time.monotonic, not on `clock`
        self.warned = False
        self.sent = 0

    def report(self, step: int, values: dict, force: bool = False) -> bool:
        if not self.enabled:
            return False
        now = self.clock()
        if not force and self.last_sent is not None and now - self.last_sent < self.interval_s:
            return False
        try:
            from kubeflow.trainer import update_trainjob_status

            ok = update_trainjob_status(
                progress_percent=int(100 * step / max(self.total, 1)),
                estimated_remaining_seconds=eta_seconds(step, self.total, self.first, now - self.started),
                metrics=status_metrics(values),
            )
        except Exception as err:  # the SDK promises not to raise; an import or version problem still must not stop us
            ok, reason = False, repr(err)
        else:
            reason = "the status server refused or was unreachable"
        if ok:
            self.last_sent, self._sent_at, self.sent = now, time.monotonic(), self.sent + 1
        elif not self.warned:
            print(
                f"distar train: warning: TrainJob progress not reported ({reason}); training goes on", file=sys.stderr
            )
            self.warned = True
        return ok

    def finish(self, step: int, values: dict) -> bool:
        """The last report (100 % when the run reached its steps): waits out the SDK's floor, so it is not dropped."""
        if not self.enabled:
            return False
        if self._sent_at is not None:
            wait = SDK_FLOOR_S - (time.monotonic() - self._sent_at)
            if wait > 0:
                time.sleep(wait)
        return self.report(step, values, force=True)
