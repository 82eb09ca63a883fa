"""Which rank stalled, from heartbeats: silent past its phase's limit, a stopped process first."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from vicuna_exp.heartbeat import DONE, Heartbeat, find_stall, limit_for, process_stopped, read_heartbeats


def _beat(rank: int, phase: str, step: int, age_s: float, pid: int = 0) -> dict:
    return {"rank": rank, "pid": pid, "phase": phase, "step": step, "time": 1000.0 - age_s}


def test_a_rank_silent_past_its_limit_is_stalled() -> None:
    beats = {0: _beat(0, "train", 7, 3), 1: _beat(1, "train", 7, 12)}
    stall = find_stall(beats, 1000.0, 10, {})
    assert stall is not None and (stall.rank, stall.step, stall.phase) == (1, 7, "train")
    assert "rank 1 stalled" in stall.describe() and "step 7, phase train" in stall.describe()
    assert find_stall(beats, 1000.0, 20, {}) is None


def test_phases_with_long_silences_get_their_own_limit() -> None:
    beats = {0: _beat(0, "prepare_data", 0, 500), 1: _beat(1, DONE, 5, 10_000)}
    assert find_stall(beats, 1000.0, 60, {"prepare_data": 3600}) is None  # finished ranks are never stalled
    assert limit_for("prepare_data", 60, {"prepare_data": 30}) == 60  # a phase limit only lengthens
    assert find_stall(beats, 1000.0, 60, {}) is not None


def test_the_stopped_process_is_named_not_the_rank_waiting_for_it() -> None:
    # rank 0 waits in a collective for rank 1 and looks just as silent (here even more so)
    beats = {0: _beat(0, "train", 4, 30, pid=100), 1: _beat(1, "train", 4, 20, pid=101)}
    assert find_stall(beats, 1000.0, 10, {}).rank == 0
    assert find_stall(beats, 1000.0, 10, {}, is_stopped=lambda pid: pid == 101).rank == 1


def test_heartbeat_file_and_a_real_stopped_process(tmp_path: Path) -> None:
    hb = Heartbeat(tmp_path, 3)
    hb.beat("train", 5)
    since = time.time() - 60
    got = read_heartbeats(tmp_path, [3, 4], since)
    assert set(got) == {3} and got[3]["step"] == 5 and got[3]["phase"] == "train" and got[3]["pid"] == os.getpid()
    assert read_heartbeats(tmp_path, [3], time.time() + 60) == {}  # an earlier attempt's beat is ignored
    json.loads(hb.path.read_text())
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert not process_stopped(child.pid)
        child.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while not process_stopped(child.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert process_stopped(child.pid)
    finally:
        child.kill()
        child.wait()
