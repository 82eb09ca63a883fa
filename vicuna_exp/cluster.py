"""Where the other nodes are, and what to do when the scheduler takes the machine away.

A multi-node job runs one task per node (SLURM via hydra-submitit-launcher, or SkyPilot); each
task starts torchrun for its node's GPUs. This module reads the node's place in the job from the
scheduler's environment and turns it into torchrun's static rendezvous, so no node needs to be
told anything by hand. Under submitit it also makes preemption safe: the early-warning signal
first lets the training processes save, and only then lets submitit requeue the job, which
restarts it in the same run directory where `trainer.resume=auto` picks up the last checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from vicuna_exp.errors import UsageError

DEFAULT_PORT = 29500
# Signals torchrun must catch and pass on to its workers instead of dying from them: SLURM delivers
# its early warning (USR1 or, with submitit >= 1.5, USR2) to every process of the job step.
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2"


def expand_nodelist(spec: str) -> list[str]:
    """SLURM's compressed host list, expanded: 'gpu[01-03,07],login' -> gpu01 gpu02 gpu03 gpu07 login.

    Zero padding follows the range's first number; several bracket groups in one name expand as a
    product ('r[1-2]n[1-2]' -> r1n1 r1n2 r2n1 r2n2), in SLURM's order.
    """
    names: list[str] = []
    for item in _split_top_level(spec.strip()):
        names.extend(_expand_one(item))
    return names


def _split_top_level(spec: str) -> list[str]:
    items, depth, current = [], 0, ""
    for ch in spec:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    if depth != 0:
        raise ValueError(f"unbalanced brackets in node list {spec!r}")
    items.append(current)
    return [i for i in items if i]


def _expand_one(item: str) -> list[str]:
    m = re.match(r"^([^\[]*)\[([^\]]+)\](.*)$", item)
    if not m:
        return [item]
    prefix, ranges, rest = m.groups()
    out = []
    for part in ranges.split(","):
        lo, _, hi = part.partition("-")
        width = len(lo)
        for n in range(int(lo), int(hi or lo) + 1):
            for tail in _expand_one(rest):
                out.append(f"{prefix}{n:0{width}d}{tail}")
    return out


def _gpu_count(value: str | None) -> int | None:
    """'8', 'a100:8' or '4(x2)' (SLURM_GPUS_PER_NODE / SLURM_GPUS_ON_NODE forms) -> GPUs per node."""
    if not value:
        return None
    m = re.search(r"(\d+)(?:\(x\d+\))?$", value.split(",")[0].strip())
    return int(m.group(1)) if m else None


def _port(env: Mapping[str, str], job_id: str) -> int:
    """MASTER_PORT when set; else one derived from the job id, so two jobs sharing a node differ."""
    if env.get("MASTER_PORT"):
        return int(env["MASTER_PORT"])
    digits = re.sub(r"\D", "", job_id)
    return 20000 + int(digits[-4:]) % 10000 if digits else DEFAULT_PORT


def rendezvous_from_env(env: Mapping[str, str]) -> dict[str, Any] | None:
    """This node's place in a multi-node job, from SLURM's or SkyPilot's variables; None elsewhere.

    Returns {source, nnodes, node_rank, master_addr, master_port, nproc_per_node, rdzv_id}, the
    same on every node except node_rank; nproc_per_node is None when the scheduler does not say
    (use cfg.launcher.nproc_per_node then).
    """
    if env.get("SLURM_JOB_ID") and env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST")):
        nodes = expand_nodelist(env.get("SLURM_JOB_NODELIST") or env["SLURM_NODELIST"])
        nnodes = int(env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES") or len(nodes))
        node_rank = int(env.get("SLURM_NODEID", "0"))
        gpus = _gpu_count(env.get("SLURM_GPUS_ON_NODE")) or _gpu_count(env.get("SLURM_GPUS_PER_NODE"))
        if gpus is None and env.get("CUDA_VISIBLE_DEVICES"):
            gpus = len([d for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()])
        job_id = env["SLURM_JOB_ID"]
        source, master = "slurm", env.get("MASTER_ADDR") or nodes[0]
    elif env.get("SKYPILOT_NODE_RANK") is not None and env.get("SKYPILOT_NODE_IPS"):
        ips = [ip.strip() for ip in env["SKYPILOT_NODE_IPS"].splitlines() if ip.strip()]
        nnodes = int(env.get("SKYPILOT_NUM_NODES") or len(ips))
        node_rank = int(env["SKYPILOT_NODE_RANK"])
        gpus = _gpu_count(env.get("SKYPILOT_NUM_GPUS_PER_NODE"))
        job_id = env.get("SKYPILOT_TASK_ID", "skypilot")
        source, master = "skypilot", ips[0]
    else:
        return None
    if not 0 <= node_rank < nnodes:
        raise UsageError(f"{source}: node rank {node_rank} is outside the job's {nnodes} nodes")
    return {
        "source": source,
        "nnodes": nnodes,
        "node_rank": node_rank,
        "master_addr": master,
        "master_port": _port(env, job_id),
        "nproc_per_node": gpus,
        "rdzv_id": job_id,
    }


def torchrun_args(rdzv: Mapping[str, Any], nproc_per_node: int, grace_s: float) -> list[str]:
    """torchrun's arguments for this node: static rendezvous at node 0, and signal handling that
    gives workers `grace_s` to save when the scheduler warns (instead of torchrun dying at once)."""
    return [
        f"--nnodes={rdzv['nnodes']}",
        f"--node_rank={rdzv['node_rank']}",
        f"--nproc_per_node={rdzv['nproc_per_node'] or nproc_per_node}",
        f"--master_addr={rdzv['master_addr']}",
        f"--master_port={rdzv['master_port']}",
        f"--signals-to-handle={TORCHRUN_SIGNALS}",
        f"--shutdown-timeout={max(1, int(grace_s))}",
    ]


def preemption_signal(env: Mapping[str, str] = os.environ) -> signal.Signals:
    """The signal submitit treats as "preempted or about to time out" (SUBMITIT_PREEMPT_SIGNAL, default USR2)."""
    name = env.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return signal.Signals[f"SIG{name}"]


def in_submitit_job(env: Mapping[str, str] = os.environ) -> bool:
    return bool(env.get("SUBMITIT_EXECUTOR"))


@dataclass
class Preemption:
    """Whether the preemption signal arrived while the child ran."""

    signalled: bool = False


@contextlib.contextmanager
def requeue_on_preemption(child: subprocess.Popen, grace_s: float,
                          env: Mapping[str, str] = os.environ) -> Iterator[Preemption]:
    """While `child` (torchrun, or a single worker) runs: on the preemption signal, ask it to save
    and stop (SIGTERM, which torchrun passes to its workers) and kill it if it is still there after
    `grace_s`. Once the body (the wait for the child) is over, hand the signal to submitit's own
    handler, which dumps the job and requeues it (and exits this process). So the requeue never
    races the save. Outside a submitit job the signal only stops the child.

    Use inside the Hydra task, around the wait for the child:
        with cluster.requeue_on_preemption(proc, cfg.trainer.preempt_grace_s):
            code = proc.wait()
    """
    sig = preemption_signal(env)
    previous = signal.getsignal(sig)
    state = Preemption()

    def handler(signum: int, frame: Any) -> None:
        # Only signal here: waiting inside a handler would deadlock with the Popen.wait it interrupted.
        state.signalled = True
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            watchdog = threading.Timer(grace_s, lambda: child.poll() is None and child.kill())
            watchdog.daemon = True
            watchdog.start()

    signal.signal(sig, handler)
    try:
        yield state
    finally:
        signal.signal(sig, previous)
        if state.signalled and in_submitit_job(env) and callable(previous):
            previous(sig, None)  # submitit: checkpoint() -> requeue -> exit
