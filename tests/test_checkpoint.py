"""Checkpoints are atomic, pruned, and a corrupt one falls back to the previous complete one."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from vicuna_exp.checkpoint import CheckpointManager, TrainerState
from vicuna_exp.distributed import DistInfo
from vicuna_exp.errors import UsageError


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


def test_a_checkpoint_from_before_the_mfu_fields_loads(tmp_path: Path) -> None:
    """trainer_state.json used to keep MFU accounting in an `extra` dict; such checkpoints still resume."""
    mgr = CheckpointManager(tmp_path, keep_last=1, dist=DistInfo())
    mgr.save(TrainerState(step=3, last_loss=2.0), _save_payload(3))
    state_file = tmp_path / "step_00000003" / "trainer_state.json"
    old = json.loads(state_file.read_text())
    del old["model_flops"], old["train_s"]
    state_file.write_text(json.dumps({**old, "extra": {"model_flops": 1.5e9, "step_s": 2.0}}))
    state = mgr.load_latest(lambda p: None)
    assert state == TrainerState(step=3, last_loss=2.0, model_flops=1.5e9, train_s=2.0)


def test_resume_sets_aside_the_checkpoints_of_another_configuration(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path / "checkpoints", keep_last=2, dist=DistInfo())
    mgr.save(TrainerState(step=2, config_hash="theirs"), _save_payload(2))
    assert mgr.resume("auto", lambda p: None, config_hash="ours") is None
    assert not mgr.complete() and (tmp_path / "checkpoints.config-theirs" / "step_00000002").is_dir()
    mgr.save(TrainerState(step=1, config_hash="ours"), _save_payload(1))
    assert mgr.resume("auto", lambda p: None, config_hash="ours").step == 1
    assert mgr.resume("never", lambda p: pytest.fail("loaded"), config_hash="ours") is None


def test_resume_from_a_path(tmp_path: Path) -> None:
    other = CheckpointManager(tmp_path / "other", keep_last=2, dist=DistInfo())
    other.save(TrainerState(step=5, config_hash="theirs"), _save_payload(5))
    mgr = CheckpointManager(tmp_path / "run" / "checkpoints", keep_last=2, dist=DistInfo())
    for path in (tmp_path / "other", tmp_path / "other" / "step_00000005"):  # a dir of checkpoints, or one
        assert mgr.resume(str(path), lambda p: None, config_hash="ours").step == 5
    with pytest.raises(UsageError, match="trainer.resume=.*nowhere: no such checkpoint directory"):
        mgr.resume(str(tmp_path / "nowhere"), lambda p: None, config_hash="ours")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no loadable checkpoint there"):
        mgr.resume(str(tmp_path / "empty"), lambda p: None, config_hash="ours")
