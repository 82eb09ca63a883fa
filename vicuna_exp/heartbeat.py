"""Per-rank heartbeats and the job's watch over them, so a stalled rank ends the job.

A worker stopped by SIGSTOP, or hung in a collective, leaves the other ranks waiting forever:
torchrun only reacts to a process that exits. So each rank writes `RUN_DIR/.workers/
heartbeat_rank_<r>.json` (step, phase, time) from its main thread as it goes, and the Hydra job
reads them. A rank whose heartbeat is older than its phase's limit (`launcher.stall_timeout_s`,
or the longer `launcher.stall_timeout_by_phase_s` of phases with long silent stretches: data
preparation, weight loading and the DeepSpeed op build) has stalled; the job then SIGKILLs every
worker (a stopped process never handles SIGTERM) and records which rank stalled, where.

Beats come from the main thread on purpose: a helper thread would go on beating while the main
thread hangs in a collective.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from vicuna_exp.rundir import WORKER_STATUS_DIR

DONE = "done"  # the phase of a rank that has ended: never a stall
_MIN_INTERVAL_S = 1.0  # beats of the same phase and step are written at most this often


def heartbeat_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / WORKER_STATUS_DIR / f"heartbeat_rank_{rank}.json"


class Heartbeat:
    """One rank's heartbeat file. Writing it never raises: a full disk is told by the write that hit it."""

    def __init__(self, run_dir: Path, rank: int) -> None:
        self.path = heartbeat_path(run_dir, rank)
        self.rank = rank
        self.phase: str | None = None
        self.step = 0
        self._written = 0.0

    def beat(self, phase: str, step: int | None = None) -> None:
        now = time.time()
        if phase == self.phase and step in (None, self.step) and now - self._written < _MIN_INTERVAL_S:
            return
        if step is not None:
            self.step = step
        self.phase, self._written = phase, now
        payload = json.dumps({"rank": self.rank, "pid": os.getpid(), "phase": phase, "step": self.step, "time": now})
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(payload)
            os.replace(tmp, self.path)
        except OSError:
            pass


_current: Heartbeat | None = None


def start(run_dir: Path, rank: int) -> Heartbeat:
    """Called once by the worker; `beat` is a no-op in a process the job does not watch."""
    global _current
    _current = Heartbeat(run_dir, rank)
    _current.beat("start")
    return _current


def beat(phase: str, step: int | None = None) -> None:
    """Mark progress in `phase` (at `step`, when the loop knows it)."""
    if _current is not None:
        _current.beat(phase, step)


# ---------------------------------------------------------------------------------------------
# The job's side
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stall:
    rank: int
    step: int
    phase: str
    silent_s: float
    limit_s: float
    pid: int | None

    def describe(self) -> str:
        return (f"rank {self.rank} stalled: no heartbeat for {self.silent_s:.0f} s (limit {self.limit_s:g} s, "
                f"launcher.stall_timeout_s) at step {self.step}, phase {self.phase}; every worker was killed")


def read_heartbeats(run_dir: Path, ranks: Iterable[int], since: float) -> dict[int, dict[str, Any]]:
    """This launch's heartbeats (an earlier attempt's are older than `since`)."""
    out = {}
    for r in ranks:
        try:
            hb = json.loads(heartbeat_path(run_dir, r).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if float(hb.get("time", 0)) >= since:
            out[r] = hb
    return out


def limit_for(phase: str, timeout_s: float, by_phase: Mapping[str, float]) -> float:
    """A phase's own limit can only be longer than the general one."""
    return max(float(timeout_s), float(by_phase.get(phase, 0.0)))


def find_stall(beats: Mapping[int, Mapping[str, Any]], now: float, timeout_s: float,
               by_phase: Mapping[str, float], is_stopped: Callable[[int], bool] = lambda pid: False) -> Stall | None:
    """The stalled rank, if any. When several are silent past their limit (the others wait on it in
    a collective), a stopped process is the cause; otherwise the longest silent."""
    late = []
    for rank, hb in beats.items():
        phase = str(hb.get("phase"))
        if phase == DONE:
            continue
        silent, limit = now - float(hb["time"]), limit_for(phase, timeout_s, by_phase)
        if silent > limit:
            pid = hb.get("pid")
            late.append((not (pid and is_stopped(int(pid))), -silent, rank,
                         Stall(rank, int(hb.get("step", 0)), phase, silent, limit, pid)))
    return min(late)[-1] if late else None


def process_stopped(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)
    except psutil.Error:
        return False


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant (torchrun's workers run in sessions of their own)."""
    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.Error:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(procs, timeout=10)


class StallWatch(threading.Thread):
    """Polls the heartbeats of this node's ranks; on a stall, records it and calls `on_stall` once."""

    def __init__(self, run_dir: Path, ranks: Iterable[int], since: float, *, timeout_s: float,
                 by_phase: Mapping[str, float], interval_s: float, on_stall: Callable[[Stall], None]) -> None:
        super().__init__(name="stall-watch", daemon=True)
        self.run_dir, self.ranks, self.since = run_dir, list(ranks), since
        self.timeout_s, self.by_phase, self.interval_s = timeout_s, dict(by_phase), max(0.1, interval_s)
        self.on_stall = on_stall
        self.stall: Stall | None = None
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.wait(self.interval_s):
            beats = read_heartbeats(self.run_dir, self.ranks, self.since)
            stall = find_stall(beats, time.time(), self.timeout_s, self.by_phase, process_stopped)
            if stall is not None:
                self.stall = stall
                self.on_stall(stall)
                return

    def stop(self) -> None:
        self._stop.set()
