"""Preemption: turn Slurm's (or a user's) stop signals into a checkpoint at the next step boundary.

Shared by clip_train and t2i. A trainer enters ``PreemptionFlag``, checks ``requested`` after
each optimizer step (OR-ed over ranks), saves, and raises ``Preempted``; experiments.job.PointJob
then hands the signal on so submitit requeues the job, which resumes from that checkpoint.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def preempt_signals() -> tuple[int, ...]:
    """PREEMPT_SIGNALS plus submitit's pre-timeout signal when ``$SUBMITIT_PREEMPT_SIGNAL`` renames it."""
    named = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)
    return tuple(dict.fromkeys([*PREEMPT_SIGNALS, *([named] if named else [])]))


class Preempted(RuntimeError):
    """A preemption signal arrived; a checkpoint was written and the run can be started again."""

    def __init__(self, step: int, checkpoint: Path | None, signum: int) -> None:
        self.step, self.checkpoint, self.signum = step, checkpoint, signum
        name = signal.Signals(signum).name if signum else "signal"
        super().__init__(f"{name} received: stopped at step {step}, checkpoint {checkpoint}")


class PreemptionFlag:
    """Turns preemption signals into a flag checked at step boundaries (a handler must not train or save).

    While active it replaces other handlers of those signals, e.g. submitit's, which would requeue
    at once and lose the steps since the last checkpoint; ``Preempted.signum`` lets the caller
    hand the signal on once the checkpoint is written (experiments.job.PointJob does).
    """

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum != 0

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __enter__(self) -> PreemptionFlag:
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            for sig in preempt_signals():
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
