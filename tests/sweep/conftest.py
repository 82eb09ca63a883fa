"""What every test that trains tiny sweep jobs in-process sets: one thread per job, the session's
data cache, and no wandb."""

from __future__ import annotations

import pytest


@pytest.fixture
def tiny_sweep_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("VICUNA_EXP_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
