"""The Hydra job's side of a multi-process run: check the hardware, start torchrun on
`python -m vicuna_exp.worker RUN_DIR`, pass stop signals on, and make `summary.json` and the
exit code say what the workers did.

Hydra runs once, here; the ranks read the resolved config the job saved in its run dir, so
there is exactly one run dir and no Hydra (or argv clash) inside the ranks. One node starts
torchrun `--standalone`; several nodes rendezvous at `launcher.rdzv_endpoint` (node 0's
host:port) with fixed ranks (`launcher.node_rank`), all writing to one shared run dir:

    vicuna-exp train backend=fsdp launcher.nproc_per_node=8
    vicuna-exp train backend=fsdp launcher.nproc_per_node=8 launcher.nnodes=2 launcher.node_rank=$NODE \\
        launcher.rdzv_endpoint=node0:29500 hydra.run.dir=/shared/runs/13b

If a worker dies, torchrun stops the others (SIGTERM, then SIGKILL after the shutdown timeout);
this job then records status `failed` with the first worker's error. A worker that stalls (stopped,
or hung in a collective) is found by its heartbeat (`vicuna_exp.heartbeat`): every worker is
SIGKILLed and the summary names the stalled rank, its step and phase (exit 1). Signals to this job
(SIGTERM, SIGINT, SIGUSR1, SIGUSR2) go to torchrun once, which hands them to every worker: they stop
at the end of the step, save, and the job exits 75.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from vicuna_exp import hardware
from vicuna_exp.backends import build_ops
from vicuna_exp.choices import BF16_PRECISIONS, BackendName, Device, DistBackend, choice_str
from vicuna_exp.cluster import rendezvous_from_env, requeue_on_preemption
from vicuna_exp.config import config_hash
from vicuna_exp.diskspace import DiskFull
from vicuna_exp.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, UsageError
from vicuna_exp.heartbeat import StallWatch, kill_tree
from vicuna_exp.provenance import provenance
from vicuna_exp.rundir import (
    SUMMARY_FILE,
    WORKER_STATUS_DIR,
    RunStatus,
    Summary,
    latest_state,
    saved_overrides,
)

log = logging.getLogger(__name__)
LAUNCH_LOG = "launch.log"  # torchrun's own stderr (the workers' stderr passes through it too)
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
SAVE_MARGIN_S = 120  # beyond trainer.preempt_grace_s, for the final checkpoint before SIGKILL


def launch(cfg: DictConfig, run_dir: Path) -> int:
    """Start the workers and wait for them; returns the job's exit code."""
    check_hardware(cfg)
    check_run_dir_shared(cfg, hydra_overrides())
    cmd = torchrun_command(cfg, run_dir)
    env = worker_env(os.environ, procs_per_node=int(cfg.launcher.nproc_per_node))
    started = time.time()
    (run_dir / WORKER_STATUS_DIR).mkdir(parents=True, exist_ok=True)
    log.info("starting %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=_die_with_parent)
    tail: list[str] = []
    tee = threading.Thread(target=_tee, args=(proc.stderr, run_dir / LAUNCH_LOG, tail), daemon=True)
    tee.start()
    previous = {sig: signal.signal(sig, lambda s, f: _forward(proc, s)) for sig in FORWARDED_SIGNALS}
    watch = stall_watch(cfg, run_dir, started, on_stall=lambda stall: kill_tree(proc.pid))
    watch.start()
    try:
        # Under submitit, its preemption signal stops the workers first; the requeue comes after the save.
        with requeue_on_preemption(proc, float(cfg.trainer.preempt_grace_s) + SAVE_MARGIN_S):
            rc = proc.wait()
    finally:
        watch.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:  # the job itself is going away: take torchrun (and its workers) with it
            proc.terminate()
            proc.wait()
    tee.join(timeout=5)
    if watch.stall is not None:
        print(f"vicuna-exp train: {watch.stall.describe()}", file=sys.stderr)
        mark_failed(cfg, run_dir, watch.stall.describe(), {str(watch.stall.rank): watch.stall.describe()}, started)
        return EXIT_FAILED
    return conclude(cfg, run_dir, rc, started, "".join(tail))


def stall_watch(cfg: DictConfig, run_dir: Path, started: float, on_stall: Any) -> StallWatch:
    """Watches this node's ranks (their heartbeats and this job share a clock)."""
    la = cfg.launcher
    first = int(la.node_rank) * int(la.nproc_per_node)
    return StallWatch(run_dir, range(first, first + int(la.nproc_per_node)), started,
                      timeout_s=float(la.stall_timeout_s), by_phase=dict(la.stall_timeout_by_phase_s),
                      interval_s=float(la.monitor_interval_s), on_stall=on_stall)


# --------------------------------------------------------------------------------------------
# Before any worker starts
# --------------------------------------------------------------------------------------------
def check_hardware(cfg: DictConfig) -> None:
    """What cannot run here, said once, before workers start (UsageError names the key)."""
    nproc, t, b = int(cfg.launcher.nproc_per_node), cfg.trainer, cfg.backend
    found = hardware.probe_gpus()  # from the driver: this process makes no CUDA context of its own
    gpus = found.count if found else 0
    device = str(t.device)
    comm = str(cfg.launcher.dist_backend)
    if device == Device.cuda and gpus == 0:
        raise UsageError("trainer.device=cuda, but no CUDA device is visible; use trainer.device=auto or cpu")
    on_gpu = device == Device.cuda or (device == Device.auto and gpus > 0)
    if comm == DistBackend.nccl and not on_gpu:
        why = "trainer.device=cpu" if gpus else "no CUDA device is visible"
        raise UsageError(f"launcher.dist_backend=nccl needs GPUs, but {why}; use launcher.dist_backend=auto (gloo on CPU)")
    if on_gpu and nproc > gpus:
        raise UsageError(f"launcher.nproc_per_node={nproc}, but this node has {gpus} GPU(s): one process per GPU")
    precision = choice_str(t.precision)
    if on_gpu and precision in BF16_PRECISIONS and not found.bf16:
        raise UsageError(f"trainer.precision={precision}: {found.name} does not support bf16; "
                         "use trainer.precision=fp32")
    if b.name == BackendName.deepspeed:
        check_deepspeed(cfg, on_gpu)


def check_deepspeed(cfg: DictConfig, on_gpu: bool) -> None:
    b = cfg.backend
    if int(b.zero_stage) not in (2, 3):
        raise UsageError(f"backend.zero_stage={b.zero_stage}: choose 2 or 3")
    if b.offload_params and int(b.zero_stage) != 3:
        raise UsageError("backend.offload_params=true needs backend.zero_stage=3")
    try:
        build_ops.use_extensions_dir()
        needed = build_ops.needed_ops(on_gpu=on_gpu, offload_optimizer=bool(b.offload_optimizer))
        for op in needed:
            build_ops.clear_stale_lock(build_ops.CPU_OPS[op])  # else every rank waits on a dead build's lock
            compatible, built = build_ops.op_status(op)
            if not compatible:
                what = "ZeRO offload (backend.offload_optimizer=true) needs DeepSpeed's CPU Adam op" \
                    if op == "CPUAdamBuilder" else "DeepSpeed on CPU needs its shared-memory communication op"
                raise UsageError(f"{what}, which cannot be built here (no C++ compiler or ninja?); see `ds_report`, "
                                 "or choose backend=deepspeed_zero3 / fsdp_offload")
            if not built:
                log.warning("DeepSpeed op %s is not pre-built: every rank will compile it now (1-2 minutes); "
                            "`python -m vicuna_exp.backends.build_ops` builds it once", op)
    except ImportError as e:
        raise UsageError(f"backend=deepspeed: deepspeed cannot be imported ({e})") from None


def check_run_dir_shared(cfg: DictConfig, hydra_overrides: list[str]) -> None:
    """Several nodes must agree on one run dir; Hydra's default is a timestamp, different on each node."""
    if int(cfg.launcher.nnodes) <= 1:
        return
    scheduler_rendezvous(cfg)  # without an rdzv_endpoint, the scheduler must say where node 0 is
    if not any(o.startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for o in hydra_overrides):
        raise UsageError("launcher.nnodes > 1: pass the same hydra.run.dir=/shared/path on every node "
                         "(the default run dir is a timestamp, which differs between nodes)")


def hydra_overrides() -> list[str]:
    """The `hydra.*` overrides of this job (kept apart from the task overrides by Hydra)."""
    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.hydra)


def torchrun_command(cfg: DictConfig, run_dir: Path) -> list[str]:
    la = cfg.launcher
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={int(la.nproc_per_node)}",
           f"--nnodes={int(la.nnodes)}"]
    rdzv = scheduler_rendezvous(cfg)
    if rdzv is not None:  # SLURM / SkyPilot: every node learns its place from the scheduler
        cmd += ["--rdzv-backend=static", f"--rdzv-endpoint={rdzv['master_addr']}:{rdzv['master_port']}",
                f"--node-rank={rdzv['node_rank']}", f"--master-addr={rdzv['master_addr']}",
                f"--master-port={rdzv['master_port']}", f"--rdzv-id={rdzv['rdzv_id']}"]
    elif int(la.nnodes) == 1:
        cmd.append("--standalone")
    else:
        host, _, port = str(la.rdzv_endpoint).rpartition(":")
        cmd += ["--rdzv-backend=static", f"--rdzv-endpoint={la.rdzv_endpoint}", f"--node-rank={int(la.node_rank)}",
                f"--master-addr={host}", f"--master-port={port}"]
        if la.rdzv_id:
            cmd.append(f"--rdzv-id={la.rdzv_id}")
    cmd += [f"--max-restarts={int(la.max_restarts)}", f"--monitor-interval={float(la.monitor_interval_s)}",
            "--signals-to-handle=" + ",".join(s.name for s in (*FORWARDED_SIGNALS, signal.SIGHUP, signal.SIGQUIT)),
            f"--shutdown-timeout={int(float(cfg.trainer.preempt_grace_s)) + SAVE_MARGIN_S}",
            "-m", "vicuna_exp.worker", str(run_dir)]
    return cmd


def scheduler_rendezvous(cfg: DictConfig) -> dict[str, Any] | None:
    """A multi-node job under SLURM or SkyPilot with no explicit `launcher.rdzv_endpoint`: node 0's
    address and this node's rank come from the scheduler's environment."""
    la = cfg.launcher
    if int(la.nnodes) == 1 or la.rdzv_endpoint:
        return None
    rdzv = rendezvous_from_env(os.environ)
    if rdzv is None:
        raise UsageError(f"launcher.nnodes={la.nnodes}: set launcher.rdzv_endpoint=HOST:PORT of node 0 and "
                         "launcher.node_rank, or run under SLURM / SkyPilot, which provide them")
    if rdzv["nnodes"] != int(la.nnodes):
        raise UsageError(f"launcher.nnodes={la.nnodes}, but {rdzv['source']} gave this job {rdzv['nnodes']} nodes")
    if rdzv["nproc_per_node"] and rdzv["nproc_per_node"] != int(la.nproc_per_node):
        raise UsageError(f"launcher.nproc_per_node={la.nproc_per_node}, but {rdzv['source']} gave each node "
                         f"{rdzv['nproc_per_node']} GPUs")
    return rdzv


def worker_env(base: Any, procs_per_node: int = 1) -> dict[str, str]:
    env = dict(base)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(build_ops.default_extensions_dir()))  # the pre-built DeepSpeed ops
    # torchrun would give each worker one thread, which cripples an optimizer step on the CPU (FSDP
    # offload, DeepSpeedCPUAdam): each gets its share of the cores this job may use, unless set.
    env.setdefault("OMP_NUM_THREADS", str(threads_per_worker(procs_per_node)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def threads_per_worker(procs_per_node: int) -> int:
    """The cores this process may run on, shared evenly by the workers of one node (at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, procs_per_node))


# --------------------------------------------------------------------------------------------
# While they run
# --------------------------------------------------------------------------------------------
def _die_with_parent() -> None:
    """torchrun gets SIGTERM if this job dies, even by SIGKILL, so no worker outlives the job."""
    set_parent_death_signal(signal.SIGTERM)


def set_parent_death_signal(sig: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(sig))  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _forward(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)


def _tee(stream: Any, path: Path, tail: list[str]) -> None:
    """Workers' and torchrun's stderr to the terminal and to the launch log; torchrun's own failure
    report (its ChildFailedError traceback) only to the log, since the job prints the root cause."""
    shown = TerminalFilter(sys.stderr.write)
    with open(path, "a", encoding="utf-8", errors="replace") as f:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace")
            shown.feed(line)
            f.write(line)
            tail.append(line)
            del tail[:-400]
    shown.flush()
    if shown.dropped:
        sys.stderr.write(f"(torchrun's own failure report is in {path})\n")


class TerminalFilter:
    """Holds a traceback back until its last line says whose it is: torchrun's ChildFailedError and
    the failure report after it are dropped; any other traceback (a worker's) is shown whole."""

    HELD_MAX = 500  # lines: a traceback longer than this is shown as it comes

    def __init__(self, write: Any) -> None:
        self.write, self.held = write, []
        self.report_rules = 0  # inside torchrun's report: its rules of '=' still to come (it has two)
        self.dropped = False

    def feed(self, line: str) -> None:
        if self.report_rules:
            self.report_rules -= line.startswith("=" * 20)
            return
        if line.startswith("Traceback (most recent call last):"):
            self.flush()
            self.held.append(line)
            return
        if not self.held:
            self.write(line)
            return
        self.held.append(line)
        if line[:1].isspace() and len(self.held) < self.HELD_MAX:
            return  # still inside the traceback's frames
        if "ChildFailedError" in line:  # torchrun's: dropped, and its report after it
            self.held, self.report_rules, self.dropped = [], 2, True
            return
        self.flush()

    def flush(self) -> None:
        for line in self.held:
            self.write(line)
        self.held = []


# --------------------------------------------------------------------------------------------
# After they end
# --------------------------------------------------------------------------------------------
def read_statuses(run_dir: Path, since: float) -> dict[int, dict[str, Any]]:
    """This launch's worker status files (older ones belong to an earlier attempt)."""
    out = {}
    for f in (run_dir / WORKER_STATUS_DIR).glob("rank_*.json"):
        try:
            status = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if status.get("time", 0) >= since:
            out[int(status["rank"])] = status
    return out


def dead_ranks(torchrun_stderr: str) -> dict[int, str]:
    """Ranks torchrun reports as failed, with how (exit code or signal), from its failure report."""
    out = {}
    for m in re.finditer(r"rank\s*:\s*(\d+)[^\n]*\n\s*exitcode\s*:\s*(-?\d+)[^\n]*\n(?:.*\n){0,2}?\s*traceback\s*:\s*([^\n]*)",
                         torchrun_stderr):
        rank, code, how = int(m.group(1)), int(m.group(2)), m.group(3).strip()
        if how.startswith("To enable traceback"):
            how = f"exit code {code}"
        out[rank] = how
    return out


def conclude(cfg: DictConfig, run_dir: Path, rc: int, started: float, torchrun_stderr: str) -> int:
    """The job's exit code from the workers' own statuses; a failure gets its root cause in summary.json."""
    world = int(cfg.launcher.nproc_per_node) * int(cfg.launcher.nnodes)
    statuses = read_statuses(run_dir, started)
    codes = {r: int(s["exit_code"]) for r, s in statuses.items()}
    full = sorted((s for s in statuses.values() if DiskFull.said(s.get("error"))), key=lambda s: s.get("time", 0))
    if full:  # the ranks that waited on it were stopped by torchrun; the disk is the cause
        code = int(full[0]["exit_code"])
        if int(cfg.launcher.node_rank) == 0:
            mark_failed(cfg, run_dir, full[0]["error"], {str(s["rank"]): s["error"] for s in full}, started,
                        status=RunStatus.interrupted if code == EXIT_INTERRUPTED else RunStatus.failed, code=code)
        return code
    complete = len(codes) == world if int(cfg.launcher.nnodes) == 1 else 0 in codes
    if complete and all(c == EXIT_OK for c in codes.values()) and rc == 0:
        return EXIT_OK
    if complete and all(c == EXIT_INTERRUPTED for c in codes.values()):
        return EXIT_INTERRUPTED
    if complete and codes and all(c in (EXIT_USAGE, EXIT_OK) for c in codes.values()) and EXIT_USAGE in codes.values():
        return EXIT_USAGE  # rank 0 has written the summary with the message
    if int(cfg.launcher.node_rank) != 0:
        return EXIT_FAILED  # node 0's job writes the summary
    error, errors = root_cause(world, statuses, dead_ranks(torchrun_stderr), rc)
    mark_failed(cfg, run_dir, error, errors, started)
    return EXIT_FAILED


def root_cause(world: int, statuses: dict[int, dict[str, Any]], dead: dict[int, str],
               rc: int) -> tuple[str, dict[str, str]]:
    """A rank that vanished without a status (killed, crashed hard) caused what the others report;
    otherwise the earliest failure is the cause."""
    errors = {str(r): s.get("error") or f"exit code {s['exit_code']}" for r, s in statuses.items()
              if int(s["exit_code"]) not in (EXIT_OK, EXIT_INTERRUPTED)}
    vanished = sorted(set(range(world)) - set(statuses))
    for r in vanished:
        errors[str(r)] = f"died without reporting: {dead.get(r, 'killed or crashed (no status)')}"
    if vanished:
        r = next((r for r in vanished if r in dead), vanished[0])
        return f"rank {r} {errors[str(r)]}", errors
    failed = sorted((s for s in statuses.values() if int(s["exit_code"]) not in (EXIT_OK, EXIT_INTERRUPTED)),
                    key=lambda s: s.get("time", 0))
    if failed:
        return f"rank {failed[0]['rank']}: {errors[str(failed[0]['rank'])]}", errors
    return f"torchrun exited with code {rc}", errors


def mark_failed(cfg: DictConfig, run_dir: Path, error: str, errors: dict[str, str], started: float, *,
                status: RunStatus = RunStatus.failed, code: int = EXIT_FAILED) -> None:
    """Keep what rank 0 wrote in this launch (steps, losses, provenance), with the root cause as the error.
    When even that cannot be written (a full disk), the reason goes to stderr."""
    summary: Summary | None = None
    try:
        if (run_dir / SUMMARY_FILE).stat().st_mtime >= started:
            summary = Summary.read(run_dir)
    except OSError:
        summary = None
    if summary is None:
        summary = _fresh_summary(cfg, run_dir)
    elif summary.error and summary.error != error:
        summary.rank0_error = summary.error
    summary.status, summary.exit_code, summary.error = status, code, error
    summary.worker_errors = errors
    try:
        summary.write(run_dir)
    except OSError as e:
        print(f"vicuna-exp train: {SUMMARY_FILE} not written ({e}); the run ended: {error}", file=sys.stderr)


def _fresh_summary(cfg: DictConfig, run_dir: Path) -> Summary:
    """What can be said without rank 0: the progress of the latest complete checkpoint."""
    state = latest_state(run_dir)
    outcome = {"status": RunStatus.failed, "exit_code": EXIT_FAILED, "overrides": saved_overrides(run_dir),
               "config_hash": config_hash(cfg), "run_dir": str(run_dir), "provenance": provenance(data_hash=None)}
    if state is None:
        return Summary(**outcome)
    return Summary.from_state(state, wall_s=state.wall_s, **outcome)
