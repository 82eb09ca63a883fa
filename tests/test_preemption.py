"""Stop signals: the flag is set, and under submitit the requeue handler runs after the save."""

from __future__ import annotations

import os
import signal

import pytest

from vicuna_exp.preemption import StopFlags


def test_signal_sets_the_stop_flag_and_restores_handlers() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    flags = StopFlags(grace_s=10, single_process=True)
    flags.install()
    os.kill(os.getpid(), signal.SIGUSR1)
    assert flags.requested and "SIGUSR1" in (flags.reason or "")
    flags.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is before


def test_submitit_handler_runs_once_the_run_is_saved(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    previous = signal.signal(signal.SIGUSR2, lambda s, f: calls.append(s))
    try:
        monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
        flags = StopFlags(grace_s=10, single_process=True)
        flags.install()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert flags.requested and calls == []  # not yet: the loop saves first
        flags.uninstall()
        assert calls == [signal.SIGUSR2]  # then submitit requeues
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_step_abandoned_only_when_it_would_not_fit_the_grace_period() -> None:
    from vicuna_exp.preemption import StopNow

    flags = StopFlags(grace_s=0.0, single_process=True)
    flags.install()
    try:
        flags.observe_step(100.0)  # steps take ~100 s: the current one cannot finish in 0 s
        with pytest.raises(StopNow), flags.interruptible():
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        flags.uninstall()
