"""`bench/gpu_check.py`: its dry run passes every part on the CPU, skipping only what a CPU cannot
run; a part that fails is reported and the next one still runs; no GPU without --dry-run is exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.py"
PARTS = ["env", "correctness", "throughput", "e2e", "fsdp", "deepspeed"]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    env["CUDA_VISIBLE_DEVICES"] = ""  # the machine's GPU, if any, is never used by these tests
    return env


def _check(out: Path, *args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path_factory.mktemp("gpu_check")
    done = _check(out, "--dry-run", timeout=2400)
    report = json.loads((out / "gpu_check.json").read_text())
    return done, report | {"md": (out / "gpu_check.md").read_text()}


def test_the_dry_run_passes_every_part(dry_run: tuple[subprocess.CompletedProcess, dict]) -> None:
    done, report = dry_run
    assert done.returncode == 0, done.stdout + done.stderr + json.dumps(report["parts"], indent=1)[-6000:]
    assert [p["part"] for p in report["parts"]] == PARTS
    assert all(p["status"] == "passed" for p in report["parts"]), [(p["part"], p["status"]) for p in report["parts"]]
    assert report["passed"] is True and report["dry_run"] is True
    assert "PASSED" in report["md"].splitlines()[0]


def test_the_dry_run_skips_only_what_a_cpu_cannot_run(dry_run: tuple[subprocess.CompletedProcess, dict]) -> None:
    _, report = dry_run
    skipped = {s["what"]: s["reason"] for p in report["parts"] for s in p["skipped"]}
    assert "nccl" in skipped and "varlen" in skipped and "flex_attention bf16 gradients" in skipped
    assert all("CUDA" in why or "CPU" in why for why in skipped.values()), skipped


def test_the_dry_run_reports_the_figures(dry_run: tuple[subprocess.CompletedProcess, dict]) -> None:
    _, report = dry_run
    parts = {p["part"]: p for p in report["parts"]}
    cases = parts["correctness"]["results"]["cases"]
    assert parts["correctness"]["results"]["torch_compile"].startswith("off")  # the dry run traces nothing
    assert {(c["kernel"], c["dtype"]) for c in cases} >= {("sdpa", "bf16"), ("sdpa", "fp32"), ("eager", "fp32")}
    runs = parts["throughput"]["results"]["runs"]
    assert {r["config"] for r in runs} >= {"sdpa, checkpointing off", "sdpa, checkpointing on"}
    for r in runs:
        assert r["tokens_per_s"] > 0 and r["mfu_profile"] > 0 and r["mfu_measured_peak"] > 0
        assert r["predicted_gib"] > 0 and r["peak_reserved_gib"] > 0
    e2e = parts["e2e"]["results"]
    assert e2e["summary"]["resumed_from_step"] == 2 and e2e["resumed_losses"]
    assert parts["deepspeed"]["results"]["op_build_s"] >= 0


def test_a_failing_part_is_reported_and_the_next_one_runs(tmp_path: Path) -> None:
    done = _check(tmp_path, "--dry-run", "--parts", "correctness,env", "--timeout", "correctness=2")
    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    by_part = {p["part"]: p for p in report["parts"]}
    assert by_part["correctness"]["status"] == "failed" and "timed out" in by_part["correctness"]["error"]
    assert by_part["env"]["status"] == "passed"
    assert report["passed"] is False


def test_no_gpu_without_dry_run_is_exit_2_in_one_line(tmp_path: Path) -> None:
    done = _check(tmp_path, timeout=300)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "--dry-run" in done.stderr
    assert not (tmp_path / "gpu_check.json").exists()


def test_an_unknown_part_is_exit_2(tmp_path: Path) -> None:
    done = _check(tmp_path, "--dry-run", "--parts", "env,speed", timeout=60)
    assert done.returncode == 2 and "speed" in done.stderr and len(done.stderr.strip().splitlines()) == 1
