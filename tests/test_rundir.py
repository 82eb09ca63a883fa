"""The run-dir format: summary.json keeps its keys whoever writes it, and reads back as it was written."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from vicuna_exp.checkpoint import CheckpointManager, TrainerState
from vicuna_exp.distributed import DistInfo
from vicuna_exp.hydra_app import compose
from vicuna_exp.rundir import (
    SUMMARY_KEYS,
    RunStatus,
    Summary,
    completed_summary,
    latest_checkpoint,
    save_resolved_config,
)

# What reports, scripts and sweeps read. Renaming or dropping one breaks them: change it on purpose.
ALWAYS = ["status", "exit_code", "error", "steps", "total_steps", "final_loss", "final_eval_loss",
          "best_eval_loss", "tokens_seen", "supervised_tokens_seen", "wall_s", "overrides", "config_hash",
          "run_dir", "derived", "tflops_per_device", "mfu", "peak_mem_gb", "hardware", "data_stats", "provenance"]
WHEN_SET = ["resumed_from_step", "traceback", "worker_errors", "rank0_error"]


def test_the_summary_keys_are_held() -> None:
    assert list(SUMMARY_KEYS) == ALWAYS + WHEN_SET


def test_a_summary_writes_every_key_and_the_optional_ones_only_when_set(tmp_path: Path) -> None:
    Summary(status=RunStatus.failed, exit_code=2, error="optim.lr: must be > 0").write(tmp_path)
    raw = json.loads((tmp_path / "summary.json").read_text())
    assert list(raw) == ALWAYS and raw["status"] == "failed" and raw["steps"] == 0
    Summary(status=RunStatus.completed, exit_code=0, resumed_from_step=4).write(tmp_path)
    assert list(json.loads((tmp_path / "summary.json").read_text())) == [*ALWAYS, "resumed_from_step"]


def test_a_summary_reads_back_and_junk_is_no_summary(tmp_path: Path) -> None:
    written = Summary.from_state(TrainerState(step=3, last_loss=1.5, tokens_seen=99), status=RunStatus.completed,
                                 exit_code=0, config_hash="abc", worker_errors={"1": "killed"})
    written.write(tmp_path)
    assert Summary.read(tmp_path) == written
    assert completed_summary(tmp_path, "abc") == written and completed_summary(tmp_path, "other") is None
    for junk in ('{"status": "compl', "[1, 2]", '{"status": "done", "exit_code": 0}', '{"steps": 3}'):
        (tmp_path / "summary.json").write_text(junk)
        assert Summary.read(tmp_path) is None, junk


def test_a_summary_of_an_earlier_version_still_reads(tmp_path: Path) -> None:
    """Run dirs written before `Summary`: the usage-error path wrote only some keys."""
    (tmp_path / "summary.json").write_text(json.dumps({
        "status": "failed", "exit_code": 2, "error": "x", "steps": 0, "overrides": [], "config_hash": "h",
        "run_dir": str(tmp_path)}))
    summary = Summary.read(tmp_path)
    assert summary is not None and summary.status == RunStatus.failed and summary.total_steps is None


def test_the_usage_error_of_a_job_writes_a_whole_summary(tmp_path: Path) -> None:
    from vicuna_exp.cli import main

    assert main(["train", "optim.lr=-1", f"hydra.run.dir={tmp_path}"]) == 2
    raw = json.loads((tmp_path / "summary.json").read_text())
    assert list(raw) == ALWAYS
    assert raw["status"] == "failed" and raw["exit_code"] == 2 and "optim.lr" in raw["error"]
    assert raw["overrides"] == ["optim.lr=-1"] and raw["config_hash"]


@pytest.mark.parametrize("with_checkpoint", [False, True])
def test_a_failed_launch_writes_a_whole_summary_from_the_latest_checkpoint(tmp_path: Path,
                                                                            with_checkpoint: bool) -> None:
    """A worker died before rank 0 wrote anything: the launcher says what the checkpoints know."""
    from vicuna_exp.launch import mark_failed

    cfg = compose(["backend=fsdp", "launcher.nproc_per_node=2"])
    save_resolved_config(cfg, tmp_path, ["backend=fsdp"])
    if with_checkpoint:
        manager = CheckpointManager(tmp_path / "checkpoints", keep_last=2, dist=DistInfo())
        manager.save(TrainerState(step=4, last_loss=2.5, tokens_seen=40, supervised_tokens_seen=20, wall_s=9.0),
                     lambda path: None)
    mark_failed(cfg, tmp_path, "rank 1 died without reporting", {"1": "died without reporting"}, time.time())
    raw = json.loads((tmp_path / "summary.json").read_text())
    assert list(raw) == [*ALWAYS, "worker_errors"]
    assert raw["status"] == "failed" and raw["exit_code"] == 1 and raw["error"].startswith("rank 1")
    assert raw["overrides"] == ["backend=fsdp"] and raw["provenance"]
    if with_checkpoint:
        assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_00000004"
        assert (raw["steps"], raw["final_loss"], raw["supervised_tokens_seen"], raw["wall_s"]) == (4, 2.5, 20, 9.0)
    else:
        assert latest_checkpoint(tmp_path) is None
        assert (raw["steps"], raw["final_loss"], raw["wall_s"]) == (0, None, None)
