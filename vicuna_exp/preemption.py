"""Stopping cleanly when the machine is about to go away.

SIGTERM (spot preemption, torchrun passing on a stop), SIGINT (Ctrl-C) and SIGUSR1/SIGUSR2 (SLURM's
early warning before a time limit; submitit asks for USR2) ask the loop to stop. It finishes the current step when that is
expected to fit in `trainer.preempt_grace_s`; otherwise, in a single process, the step is
abandoned at once and the state of the last completed step is saved. With several processes
the decision is taken at the end of the step by all ranks together (a rank leaving a collective
alone would hang the rest), so a short grace period relies on periodic checkpoints.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


class StopNow(Exception):
    """Raised from the signal handler to abandon the step in progress."""


class StopFlags:
    def __init__(self, *, grace_s: float, single_process: bool) -> None:
        self.grace_s = grace_s
        self.single_process = single_process
        self.requested = False
        self.reason: str | None = None
        self.signum: int | None = None
        self._step_s: float | None = None  # moving average of recent step times
        self._step_started: float | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                return

    def uninstall(self) -> None:
        """Restore the previous handlers. Under submitit, once the checkpoint is saved, its own
        handler gets the preemption signal we took, so it requeues the job (and exits)."""
        from vicuna_exp.cluster import in_submitit_job, preemption_signal

        chained = self._previous.get(self.signum) if self.signum is not None else None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
        if in_submitit_job() and self.signum == preemption_signal() and callable(chained):
            chained(self.signum, None)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        self.signum = signum
        self.reason = f"received {signal.Signals(signum).name}"
        if self.single_process and self._step_started is not None and not self._fits_in_grace():
            raise StopNow(self.reason)

    def _fits_in_grace(self) -> bool:
        if self._step_s is None or self._step_started is None:
            return True  # no estimate yet: finish the step
        remaining = self._step_s - (time.monotonic() - self._step_started)
        return remaining <= self.grace_s

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """Forward and backward passes: safe to abandon (the optimizer has not stepped)."""
        self._step_started = time.monotonic()
        try:
            yield
        finally:
            self._step_started = None

    def observe_step(self, seconds: float) -> None:
        self._step_s = seconds if self._step_s is None else 0.7 * self._step_s + 0.3 * seconds
