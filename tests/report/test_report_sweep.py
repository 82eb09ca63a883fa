"""`vicuna-exp report` on hand-made sweep dirs: the table's values, bad jobs, mixed metrics."""

from __future__ import annotations

import base64
import json
import re
import sys
import types
from pathlib import Path

import pytest
from report_sweep_builder import write_job

from vicuna_exp.report import main
from vicuna_exp.report.collect import load_sweep
from vicuna_exp.report.compare import assess_fairness, build_table

FIXED = ["trainer.tokens_per_step=4096", "trainer.max_steps=4"]
ARMS = [("512", "fsdp", 3.0, 800.0), ("512", "deepspeed_zero3", 3.2, 700.0),
        ("2048", "fsdp", 2.8, 600.0), ("2048", "deepspeed_zero3", 2.9, 550.0)]


def _grid(root: Path) -> Path:
    for i, (ctx, backend, loss0, tps) in enumerate(ARMS):
        write_job(root, f"{i}_context={ctx},backend={backend}", [f"context={ctx}", f"backend={backend}", *FIXED],
                  loss0=loss0, tokens_per_s=tps)
    return root


def _rows(root: Path) -> dict[str, dict]:
    table = build_table(load_sweep(root))
    return {r["name"]: r for r in table.rows}


def test_table_has_a_row_per_job_with_axes_and_values(tmp_path: Path) -> None:
    sweep = load_sweep(_grid(tmp_path))
    assert sweep.axes == ["context", "backend"]
    assert sweep.constant_overrides == FIXED
    table = build_table(sweep)
    titles = [c.title for c in table.columns]
    assert titles[:2] == ["job", "status"]  # a job is labelled by the swept axes alone
    for want in ("status", "final eval_loss", "best eval_loss", "tokens/s", "wall time"):
        assert want in titles
    assert "MFU" not in titles  # optional columns appear only when some job logged them
    rows = {r["name"]: r for r in table.rows}
    assert len(rows) == 4
    r = rows["1_context=512,backend=deepspeed_zero3"]
    assert r["job"] == "context=512, backend=deepspeed_zero3"
    assert (r["axis:context"], r["axis:backend"], r["status"]) == ("512", "deepspeed_zero3", "completed")
    assert r["final_eval_loss"] == pytest.approx(3.2 * 0.6)
    assert r["best_eval_loss"] == pytest.approx(3.2 * 0.6)
    assert r["tokens_seen"] == 4000
    assert r["tokens_per_s"] == pytest.approx(700.0)  # median after the slow first step
    assert r["wall_s"] == pytest.approx(3.0)
    cells = dict(zip(titles, table.cells(r), strict=True))
    assert cells["final eval_loss"] == "1.9200"
    assert cells["tokens seen"] == "4k"
    assert cells["wall time"] == "3.0 s"


def test_main_writes_markdown_html_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _grid(tmp_path / "sweep")
    assert main([str(root)]) == 0
    out = capsys.readouterr().out
    assert "context=512, backend=fsdp" in out and "completed" in out
    assert "0_context=512" not in out  # the dir names, which repeat the shared overrides, are not labels
    md = (root / "report.md").read_text()
    assert "| job | status |" in md
    assert re.search(r"\| context=2048, backend=fsdp \| completed \| 4 \| [0-9.]+ \| 1\.6800 \|", md)
    assert "trainer.tokens_per_step=4096" in md
    assert "trainer.tokens_per_step = 4096" not in md  # the shared override is listed once, as an override
    assert "context.length differs (512 vs 2048)" in md
    assert "the same held-out conversations for every arm" in md
    for name in ("report_loss.png", "report_eval_loss.png", "report_throughput.png"):
        assert (root / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in md
    page = (root / "report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 3
    assert all(base64.b64decode(i)[:4] == b"\x89PNG" for i in images)
    # Self-contained: nothing refers outside the file.
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert "@import" not in page and "url(" not in page


def test_unreadable_jobs_are_shown_and_the_rest_reported(tmp_path: Path) -> None:
    root = _grid(tmp_path)
    bad_json = write_job(root, "4_corrupt_summary", ["context=512", "backend=ddp", *FIXED])
    (bad_json / "summary.json").write_text('{"status": "compl')
    no_summary = write_job(root, "5_no_summary", ["context=2048", "backend=ddp", *FIXED])
    (no_summary / "summary.json").unlink()
    bad_metrics = write_job(root, "6_bad_metrics", ["context=512", "backend=single", *FIXED])
    lines = (bad_metrics / "metrics.jsonl").read_text().splitlines()
    lines[1] = "{garbage"
    (bad_metrics / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    torn = write_job(root, "7_torn_last_line", ["context=2048", "backend=single", *FIXED])
    with (torn / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss"')  # a writer killed mid-line: tolerated
    rows = _rows(root)
    assert rows["4_corrupt_summary"]["status"] == "unreadable"
    assert "summary.json: not valid JSON" in rows["4_corrupt_summary"]["note"]
    assert rows["5_no_summary"]["status"] == "unreadable"
    assert "summary.json: missing" in rows["5_no_summary"]["note"]
    assert rows["6_bad_metrics"]["status"] == "unreadable"
    assert "metrics.jsonl: line 2" in rows["6_bad_metrics"]["note"]
    assert rows["6_bad_metrics"]["final_eval_loss"] is None
    assert rows["7_torn_last_line"]["status"] == "completed"
    assert sum(r["status"] == "completed" for r in rows.values()) == 5
    assert main([str(root)]) == 0
    assert "unreadable" in (root / "report.md").read_text()


def test_jobs_with_different_metrics_give_blanks(tmp_path: Path) -> None:
    write_job(tmp_path, "a", ["context=512"], extra_train={"mfu": 0.31, "peak_mem_gb": 2.5})
    write_job(tmp_path, "b", ["context=2048"], eval_every=None, summary_extra={"wall_s": None})
    # a job from an older version: no tokens_per_s at all, and a summary without most keys
    c = write_job(tmp_path, "c", ["context=4096"])
    (c / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0, "tokens": 10}) + "\n")
    (c / "summary.json").write_text(json.dumps({"status": "completed"}))
    table = build_table(load_sweep(tmp_path))
    titles = [col.title for col in table.columns]
    assert "MFU" in titles and "peak mem" in titles
    rows = {r["name"]: dict(zip(titles, table.cells(r), strict=True)) for r in table.rows}
    assert rows["a"]["MFU"] == "31.0%" and rows["a"]["peak mem"] == "2.50 GB"
    assert rows["b"]["MFU"] == "" and rows["b"]["best eval_loss"] == "" and rows["b"]["final eval_loss"] == ""
    assert rows["b"]["wall time"] == "2.0 s"  # null in summary.json: taken from metrics.jsonl
    assert rows["c"]["tokens/s"] == "" and rows["c"]["final loss"] == "2.0000" and rows["c"]["steps"] == "1"
    assert main([str(tmp_path)]) == 0
    assert (tmp_path / "report_eval_loss.png").exists()


def test_failed_job_and_sweep_json_listing(tmp_path: Path) -> None:
    _grid(tmp_path)
    write_job(tmp_path, "4_failed", ["context=512", "optim.lr=-1", *FIXED], status="failed", steps=1,
              error="Traceback (most recent call last):\n  ...\nUsageError: optim.lr: must be > 0, got -1.0")
    listing = [{"name": "0_context=512,backend=fsdp", "status": "skipped", "overrides": []},
               {"name": "9_never_started", "status": "failed", "error": "CUDA out of memory",
                "overrides": ["context=2048", "backend=fsdp", *FIXED]},
               {"name": None, "status": "interrupted", "error": "did not run: the sweep stopped before this job",
                "overrides": ["context=4096", "backend=fsdp"]}]
    (tmp_path / "sweep.json").write_text(json.dumps({
        "name": "context_length", "description": "512 vs 2048 at equal tokens per step",
        "axes": {"backend": ["fsdp"], "context": ["512", "2048"]}, "group": "context_length-abc", "jobs": listing}))
    sweep = load_sweep(tmp_path)
    assert sweep.axes[:2] == ["backend", "context"]  # sweep.json's axis order wins
    rows = {r["name"]: r for r in build_table(sweep).rows}
    assert rows["4_failed"]["status"] == "failed"
    assert rows["4_failed"]["note"].startswith("UsageError: optim.lr: must be > 0")
    assert rows["9_never_started"]["status"] == "failed"
    assert "CUDA out of memory" in rows["9_never_started"]["note"]
    assert rows["0_context=512,backend=fsdp"]["status"] == "completed"
    assert "skipped on rerun" in rows["0_context=512,backend=fsdp"]["note"]
    assert rows["(not run) context=4096 backend=fsdp"]["status"] == "interrupted"
    assert "not part of the latest run" in rows["1_context=512,backend=deepspeed_zero3"]["note"]
    assert main([str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# Sweep report: context_length")
    assert "512 vs 2048 at equal tokens per step" in md


def test_fairness_reports_what_differed(tmp_path: Path) -> None:
    write_job(tmp_path, "a", ["context=512", "trainer.tokens_per_step=4096"], tokens_per_step=1000)
    write_job(tmp_path, "b", ["context=2048", "trainer.tokens_per_step=8192"], tokens_per_step=2000)
    f = assess_fairness(load_sweep(tmp_path))
    text = "\n".join(f.caveats)
    assert "Token budget differed" in text
    assert "tokens_per_step is not the same fixed value" in text
    assert any(v.startswith("trainer.tokens_per_step: 4096 | 8192") for v in f.varied)
    assert not any(h.startswith("trainer.tokens_per_step") for h in f.held)
    assert "trainer.seed = 42" in f.held


def test_eval_summaries_become_columns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _grid(tmp_path)
    evaluated = tmp_path / "0_context=512,backend=fsdp"
    (evaluated / "eval").mkdir()
    calls = []

    def summarize_run_eval(run_dir: Path) -> dict | None:
        calls.append(Path(run_dir))
        return {"mt_bench_score": 6.25, "judge": "gpt-4"}

    fake = types.ModuleType("vicuna_exp.eval.report")
    fake.summarize_run_eval = summarize_run_eval
    monkeypatch.setitem(sys.modules, "vicuna_exp.eval.report", fake)
    assert main([str(tmp_path)]) == 0
    assert calls == [evaluated]  # only jobs with an eval/ dir
    md = (tmp_path / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| job |"))
    assert "| mt_bench_score | judge |" in header
    row = next(line for line in md.splitlines() if line.startswith("| context=512, backend=fsdp |"))
    assert "| 6.25 | gpt-4 |" in row

    monkeypatch.setitem(sys.modules, "vicuna_exp.eval.report", None)  # the module is absent
    assert main([str(tmp_path)]) == 0
    assert "vicuna_exp.eval.report unavailable" in (tmp_path / "report.md").read_text()


def test_bad_paths_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 2
    assert "no job dirs found" in capsys.readouterr().err


def test_labels_tables_and_plots_read_at_a_glance(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The 2x2 `context=512,2048 data.packing=true,false` as a new user runs it: each job is labelled
    by its axes alone, shared overrides are listed once, the console table keeps to 120 columns,
    and the loss plot turns logarithmic in x when the unpacked arms see far fewer tokens."""
    from vicuna_exp.report.plots import wants_log_x
    from vicuna_exp.report.render import CONSOLE_WIDTH

    shared = ["logger=none", "trainer.max_steps=8"]
    for i, (ctx, packing) in enumerate([("512", "True"), ("512", "False"), ("2048", "True"), ("2048", "False")]):
        write_job(tmp_path, f"{i}_context={ctx},data.packing={packing},{','.join(shared)}",
                  [f"context={ctx}", f"data.packing={packing}", *shared],
                  tokens_per_step=1000 if packing == "True" else 100)
    sweep = load_sweep(tmp_path)
    rows = {r["name"].split("_", 1)[0]: r for r in build_table(sweep).rows}
    assert rows["1"]["job"] == "context=512, packing=false"
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= CONSOLE_WIDTH
    assert "context=2048, packing=true" in out and "trainer.max_steps=8" in out.split("held constant")[1]
    assert out.count("trainer.max_steps=8") == 1  # once, under held constant: not in rows, nor in caveats
    assert wants_log_x([[(100.0, 1.0), (800.0, 0.9)], [(10.0, 1.0), (80.0, 0.9)]])
    assert not wants_log_x([[(100.0, 1.0), (800.0, 0.9)], [(100.0, 1.0), (400.0, 0.9)]])
