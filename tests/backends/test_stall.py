"""A stalled rank ends the job: rank 1 of 2 under fsdp is stopped with SIGSTOP (it never handles
SIGTERM, and rank 0 waits for it in a collective). Its heartbeat goes stale, the job SIGKILLs
every worker, names the rank, its step and phase, exits 1, and the same command resumes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from backend_jobs import run_job, wait_gone, workers_of

pytestmark = pytest.mark.multiprocess

SMALL = ["logger=none", "trainer.micro_batch_size=1", "trainer.global_batch_size=4", "trainer.max_steps=4",
         "trainer.eval_every_steps=null", "trainer.eval_max_rows=4", "trainer.save_every_steps=2",
         "trainer.save_final=false", "model.hidden_size=64", "model.intermediate_size=128",
         "model.num_hidden_layers=2", "context=512", "backend=fsdp", "launcher.nproc_per_node=2",
         # a short limit for training steps; the other phases keep long ones
         "launcher.stall_timeout_s=8", *(f"+launcher.stall_timeout_by_phase_s.{p}=300"
                                         for p in ("start", "eval", "checkpoint", "finish"))]


def test_a_stopped_rank_is_killed_named_and_the_rerun_resumes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    stopped = run_job(run_dir, SMALL, cwd=tmp_path / "cwd", when=lambda step: step >= 3,
                      action=lambda proc: workers_of(proc.pid)[1].suspend())
    assert stopped.stopped_after is not None
    assert stopped.rc == 1, stopped.stderr[-3000:]
    assert not wait_gone(stopped.pids), "processes outlived the job"
    s = stopped.summary
    assert s["status"] == "failed" and s["error"].startswith("rank 1 stalled"), s["error"]
    m = re.search(r"at step (\d+), phase (\w+)", s["error"])
    # its last completed step: the one the job saw, or the one before when it was stopped mid-step
    assert m and int(m.group(1)) in (stopped.stopped_after - 1, stopped.stopped_after), (s["error"], stopped.stopped_after)
    assert m.group(2) == "train"
    assert s["error"] in stopped.stderr
    assert (run_dir / "checkpoints" / "step_00000002" / "trainer_state.json").is_file()

    resumed = run_job(run_dir, SMALL, cwd=tmp_path / "cwd")
    assert resumed.rc == 0, resumed.stderr[-3000:]
    assert resumed.summary["status"] == "completed" and resumed.summary["resumed_from_step"] >= 2
