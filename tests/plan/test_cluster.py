"""Rendezvous from faked SLURM/SkyPilot environments, and save-then-requeue on preemption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vicuna_exp import cluster
from vicuna_exp.errors import UsageError

FAKE_TRAINER = Path(__file__).with_name("fake_trainer.py")


@pytest.mark.parametrize("spec,expected", [
    ("node7", ["node7"]),
    ("gpu[01-03,07],login", ["gpu01", "gpu02", "gpu03", "gpu07", "login"]),
    ("a[8-11]", ["a8", "a9", "a10", "a11"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("dgx-[098-100].cluster", ["dgx-098.cluster", "dgx-099.cluster", "dgx-100.cluster"]),
])
def test_expand_nodelist(spec, expected):
    assert cluster.expand_nodelist(spec) == expected


def _slurm(**extra: str) -> dict[str, str]:
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[12-13]", "SLURM_NNODES": "2", "SLURM_NODEID": "1",
           "SLURM_GPUS_ON_NODE": "8", "SLURM_PROCID": "1"}
    env.update(extra)
    return env


def test_slurm_rendezvous_every_node_agrees_on_master():
    r0 = cluster.rendezvous_from_env(_slurm(SLURM_NODEID="0", SLURM_PROCID="0"))
    r1 = cluster.rendezvous_from_env(_slurm())
    assert r1 == {"source": "slurm", "nnodes": 2, "node_rank": 1, "master_addr": "gpu12", "master_port": 24242,
                  "nproc_per_node": 8, "rdzv_id": "4242"}
    assert {k: v for k, v in r0.items() if k != "node_rank"} == {k: v for k, v in r1.items() if k != "node_rank"}


def test_slurm_gpu_count_fallbacks_and_explicit_port():
    env = _slurm(SLURM_GPUS_ON_NODE="", SLURM_GPUS_PER_NODE="a100:4", MASTER_PORT="31000")
    r = cluster.rendezvous_from_env(env)
    assert r["nproc_per_node"] == 4 and r["master_port"] == 31000
    env = _slurm(SLURM_GPUS_ON_NODE="", CUDA_VISIBLE_DEVICES="0,1")
    assert cluster.rendezvous_from_env(env)["nproc_per_node"] == 2
    assert cluster.rendezvous_from_env(_slurm(SLURM_GPUS_ON_NODE=""))["nproc_per_node"] is None


def test_skypilot_rendezvous():
    env = {"SKYPILOT_NODE_RANK": "2", "SKYPILOT_NODE_IPS": "10.0.0.5\n10.0.0.6\n10.0.0.7\n",
           "SKYPILOT_NUM_NODES": "3", "SKYPILOT_NUM_GPUS_PER_NODE": "8", "SKYPILOT_TASK_ID": "sky-2024-x"}
    r = cluster.rendezvous_from_env(env)
    assert r["source"] == "skypilot" and r["master_addr"] == "10.0.0.5" and r["nnodes"] == 3
    assert r["node_rank"] == 2 and r["nproc_per_node"] == 8
    head = cluster.rendezvous_from_env(dict(env, SKYPILOT_NODE_RANK="0"))
    assert head["master_port"] == r["master_port"] and 20000 <= r["master_port"] < 30000


def test_no_scheduler_and_bad_rank():
    assert cluster.rendezvous_from_env({"HOME": "/root"}) is None
    with pytest.raises(UsageError, match="node rank 5"):
        cluster.rendezvous_from_env(_slurm(SLURM_NODEID="5"))


def test_torchrun_args_use_static_rendezvous_and_catch_scheduler_signals():
    args = cluster.torchrun_args(cluster.rendezvous_from_env(_slurm()), nproc_per_node=1, grace_s=90)
    assert "--nnodes=2" in args and "--node_rank=1" in args and "--nproc_per_node=8" in args
    assert "--master_addr=gpu12" in args and "--shutdown-timeout=90" in args
    assert any(a.startswith("--signals-to-handle=") and "SIGUSR1" in a and "SIGUSR2" in a for a in args)
    # torchrun itself accepts them
    from torch.distributed.run import get_args_parser

    parsed = get_args_parser().parse_args(args + ["train.py"])
    assert parsed.nnodes == "2" and parsed.shutdown_timeout == 90


def test_preemption_signal_lets_child_save_before_submitit_requeues(tmp_path):
    """In a faked submitit job: the signal reaches the child as SIGTERM, the child's save
    completes, and only then does submitit's own handler (here a recorder) run."""
    script = tmp_path / "parent.py"
    state = tmp_path / "state.json"
    script.write_text(f"""
import json, signal, subprocess, sys, time
from pathlib import Path
from vicuna_exp import cluster
events = []
def submitit_handler(signum, frame):
    events.append(("requeue", json.loads(Path({str(state)!r}).read_text())["saves"]))
    Path({str(tmp_path / 'events.json')!r}).write_text(json.dumps(events))
    sys.exit(0)
signal.signal(cluster.preemption_signal(), submitit_handler)
child = subprocess.Popen([sys.executable, {str(FAKE_TRAINER)!r}, {str(state)!r}, "100000"])
print("ready", flush=True)
with cluster.requeue_on_preemption(child, grace_s=20) as pre:
    child.wait()
""")
    env = dict(os.environ, SUBMITIT_EXECUTOR="slurm", SUBMITIT_PREEMPT_SIGNAL="USR2")
    parent = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True)
    assert parent.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 20
    while not state.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    parent.send_signal(signal.SIGUSR2)
    assert parent.wait(timeout=30) == 0
    events = json.loads((tmp_path / "events.json").read_text())
    assert events == [["requeue", 1]]  # the save happened before the requeue
    assert json.loads(state.read_text())["step"] > 0


class _CheckpointableTraining:
    """What hydra-submitit-launcher does: a callable with `checkpoint` that resubmits itself."""

    def __init__(self, state: str, steps: int) -> None:
        self.state, self.steps = state, steps

    def __call__(self) -> dict:
        child = subprocess.Popen([sys.executable, str(FAKE_TRAINER), self.state, str(self.steps)])
        with cluster.requeue_on_preemption(child, grace_s=20):
            code = child.wait()
        return {"exit": code, **json.loads(Path(self.state).read_text())}

    def checkpoint(self) -> object:
        import submitit

        return submitit.helpers.DelayedSubmission(_CheckpointableTraining(self.state, self.steps))


def test_submitit_local_executor_requeues_and_resumes(tmp_path):
    """submitit's local executor sends the preemption signal before its time limit, requeues the
    job, and the second run resumes from the step the first one saved."""
    import cloudpickle
    import submitit

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    state = tmp_path / "state.json"
    executor = submitit.LocalExecutor(folder=tmp_path / "submitit", max_num_timeout=4)
    # timeout 0.1 min = 6 s, warning 3 s before: every run is interrupted after ~3 s.
    executor.update_parameters(timeout_min=0.1, signal_delay_s=3)
    # steps of 0.05 s: 100 steps outlast one run; on a loaded machine a third run may be needed
    job = executor.submit(_CheckpointableTraining(str(state), 100))
    result = job.result()
    assert result["exit"] == 0 and result["step"] == 100
    assert result["starts"] >= 2 and result["saves"] == result["starts"] - 1, result


def test_launch_takes_the_rendezvous_from_slurm(monkeypatch):
    """A 2-node SLURM job with no rdzv_endpoint: torchrun gets node 0's address and this node's rank."""
    from vicuna_exp.hydra_app import compose
    from vicuna_exp.launch import torchrun_command

    cfg = compose([])
    cfg.launcher.nnodes, cfg.launcher.nproc_per_node = 2, 4
    for k, v in {"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "gpu[03-04]", "SLURM_NNODES": "2",
                 "SLURM_NODEID": "1", "SLURM_GPUS_ON_NODE": "4"}.items():
        monkeypatch.setenv(k, v)
    cmd = " ".join(torchrun_command(cfg, Path("/shared/run")))
    assert "--node-rank=1" in cmd and "--master-addr=gpu03" in cmd and "--nnodes=2" in cmd
    assert "--standalone" not in cmd
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "8")
    with pytest.raises(UsageError, match="launcher.nproc_per_node=4"):
        torchrun_command(cfg, Path("/shared/run"))
