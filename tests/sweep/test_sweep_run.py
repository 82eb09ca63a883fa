"""`vicuna-exp sweep`: a real 2 x 2 multirun of the tiny model, a rerun that skips it, a failing arm.

One sweep dir is shared by the tests in order (module-scoped), so the suite trains four tiny jobs
once; the rerun and the failing arm reuse them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vicuna_exp import sweep
from vicuna_exp.report import main as report_main
from vicuna_exp.report.collect import load_sweep
from vicuna_exp.report.compare import build_table

# Tiny and short: 4,096 tokens per step is 8 rows at 512 or 2 rows at 2048.
SMALL = ["trainer.tokens_per_step=4096", "trainer.micro_batch_size=2", "trainer.max_steps=2",
         "trainer.eval_max_rows=2", "trainer.save_final=false", "logger=none",
         "model.hidden_size=64", "model.intermediate_size=128", "model.num_hidden_layers=2"]
NAMES = ["context=512,optim.lr=0.003", "context=512,optim.lr=0.002",
         "context=2048,optim.lr=0.003", "context=2048,optim.lr=0.002"]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sweeps") / "context_length"


pytestmark = pytest.mark.usefixtures("tiny_sweep_env")  # tests/sweep/conftest.py


def _run(sweep_dir: Path, *overrides: str) -> tuple[int, dict]:
    code = sweep.main(["context_length", *overrides, *SMALL, f"hydra.sweep.dir={sweep_dir}"])
    return code, json.loads((sweep_dir / "sweep.json").read_text())


def test_2x2_sweep_completes_and_reports_four_jobs(sweep_dir: Path) -> None:
    code, result = _run(sweep_dir, "optim.lr=0.003,0.002")
    assert code == 0
    assert [j["name"] for j in result["jobs"]] == NAMES
    assert [j["status"] for j in result["jobs"]] == ["completed"] * 4
    assert result["axes"] == {"context": ["512", "2048"], "optim.lr": ["0.003", "0.002"]}
    assert result["group"].startswith("context_length-")
    for name in NAMES:
        summary = json.loads((sweep_dir / name / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["steps"] == 2
        assert "trainer.tokens_per_step=4096" in summary["overrides"]
        assert summary["derived"]["tokens_per_step"] == 4096

    assert report_main([str(sweep_dir)]) == 0
    table = build_table(load_sweep(sweep_dir))
    rows = {r["name"]: r for r in table.rows}
    assert sorted(rows) == sorted(NAMES)
    assert all(r["status"] == "completed" and r["final_eval_loss"] is not None for r in rows.values())
    assert rows["context=2048,optim.lr=0.002"]["axis:context"] == "2048"
    assert "| context=512, lr=0.003 | completed |" in (sweep_dir / "report.md").read_text()


def test_rerun_skips_completed_jobs_and_resumes_an_interrupted_one(sweep_dir: Path) -> None:
    interrupted = sweep_dir / NAMES[3] / "summary.json"
    summary = json.loads(interrupted.read_text())
    summary["status"] = "interrupted"  # as if the job had been preempted after its last checkpoint
    interrupted.write_text(json.dumps(summary))
    untouched = (sweep_dir / NAMES[0] / "summary.json").read_text()

    code, result = _run(sweep_dir, "optim.lr=0.003,0.002")
    assert code == 0
    assert [j["status"] for j in result["jobs"]] == ["skipped", "skipped", "skipped", "completed"]
    assert (sweep_dir / NAMES[0] / "summary.json").read_text() == untouched
    resumed = json.loads(interrupted.read_text())
    assert resumed["status"] == "completed"
    assert resumed.get("resumed_from_step") == 2  # from its checkpoint, not from scratch


def test_failing_arm_is_recorded_and_the_others_complete_under_joblib(sweep_dir: Path) -> None:
    code, result = _run(sweep_dir, "optim.lr=0.003,-1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert code == 1
    by_name = {j["name"]: j for j in result["jobs"]}
    assert by_name["context=512,optim.lr=0.003"]["status"] == "skipped"
    assert by_name["context=2048,optim.lr=0.003"]["status"] == "skipped"
    for name in ("context=512,optim.lr=-1", "context=2048,optim.lr=-1"):
        assert by_name[name]["status"] == "failed"
        assert by_name[name]["exit_code"] == 2
        assert "optim.lr" in by_name[name]["error"] and "> 0" in by_name[name]["error"]

    rows = {r["name"]: r for r in build_table(load_sweep(sweep_dir)).rows}
    assert rows["context=512,optim.lr=-1"]["status"] == "failed"
    assert "optim.lr" in rows["context=512,optim.lr=-1"]["note"]
    assert [rows[n]["status"] for n in NAMES] == ["completed"] * 4

    (sweep_dir / "sweep.json").unlink()  # the job dirs alone still tell why a job failed
    rows = {r["name"]: r for r in build_table(load_sweep(sweep_dir)).rows}
    assert rows["context=2048,optim.lr=-1"]["status"] == "failed"
    assert "optim.lr" in rows["context=2048,optim.lr=-1"]["note"]
