"""Checkpoints are atomic, pruned, and a corrupt one falls back to the previous complete one."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from vicuna_exp.checkpoint import CheckpointManager, TrainerState
from vicuna_exp.distributed import DistInfo


def _save_payload(value: int):
    def save(path: Path) -> None:
        (path / "payload.json").write_text(json.dumps({"value": value}))
    return save


def test_keeps_the_last_n_and_never_lists_temporary_dirs(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=2, dist=DistInfo())
    for step in (1, 2, 3):
        mgr.save(TrainerState(step=step), _save_payload(step))
    (tmp_path / ".tmp-step_00000004").mkdir()  # a save cut off mid-write
    assert [p.name for p in mgr.complete()] == ["step_00000002", "step_00000003"]


def test_partial_checkpoint_without_state_file_is_ignored(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=3, dist=DistInfo())
    mgr.save(TrainerState(step=1), _save_payload(1))
    (tmp_path / "step_00000002").mkdir()  # renamed by hand, or a foreign dir: no trainer_state.json
    loaded: list[int] = []
    state = mgr.load_latest(lambda p: loaded.append(json.loads((p / "payload.json").read_text())["value"]))
    assert state is not None and state.step == 1 and loaded == [1]


def test_corrupt_checkpoint_falls_back_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=3, dist=DistInfo())
    mgr.save(TrainerState(step=1), _save_payload(1))
    mgr.save(TrainerState(step=2), _save_payload(2))
    (tmp_path / "step_00000002" / "payload.json").write_text("{not json")
    loaded: list[int] = []
    with caplog.at_level(logging.WARNING):
        state = mgr.load_latest(lambda p: loaded.append(json.loads((p / "payload.json").read_text())["value"]))
    assert state is not None and state.step == 1 and loaded == [1]
    assert "step_00000002" in caplog.text


def test_rng_is_restored(tmp_path: Path) -> None:
    import torch

    mgr = CheckpointManager(tmp_path, keep_last=1, dist=DistInfo())
    torch.manual_seed(0)
    mgr.save(TrainerState(step=1), _save_payload(1))
    expected = torch.rand(3)
    torch.manual_seed(123)
    mgr.load_latest(lambda p: None)
    assert torch.equal(torch.rand(3), expected)
