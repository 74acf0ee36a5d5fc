"""Preemption: SIGTERM / SIGUSR1 set a flag; the loop checkpoints at the next step boundary and exits.

SLURM sends SIGTERM (or a chosen signal such as SIGUSR1 via `--signal`) before a time limit or
preemption; torchrun forwards SIGTERM to its workers. The handler only sets a flag (nothing is safe
to do inside a signal handler mid-collective); the flag is combined over ranks with the step's
metrics all-reduce, so every rank stops after the same step.
"""

from __future__ import annotations

import signal

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again" -- the job can be requeued and resumes from `latest`
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    """Set by SIGTERM/SIGUSR1; read once per step."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""

    def install(self) -> "StopFlag":
        for sig in SIGNALS:
            signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, _frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name


def requeue_message(step: int, folder) -> str:
    return (f"preempted: checkpoint {folder} written after step {step}; exiting with code {REQUEUE_EXIT_CODE}. "
            "The job can be requeued (e.g. `scontrol requeue $SLURM_JOB_ID`) and will resume from `latest`.")
