"""The wandb Report of a sweep is built (never saved: no network); --wandb without a key exits 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from report_sweep_builder import write_job

from vicuna_exp.report import main
from vicuna_exp.report.collect import load_sweep
from vicuna_exp.report.compare import assess_fairness
from vicuna_exp.report.wandb_report import (
    EVAL_LOSS,
    LOSS,
    TOKENS_PER_S,
    X_TOKENS,
    build_wandb_report,
    sweep_group,
)


@pytest.fixture()
def no_wandb_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_IDENTITY_TOKEN_FILE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_MODE", "offline")


def _sweep(root: Path) -> Path:
    for ctx in ("512", "2048"):
        write_job(root, f"context={ctx}", [f"context={ctx}", "trainer.tokens_per_step=4096"])
    (root / "sweep.json").write_text(json.dumps({"name": "context_length", "group": "context_length-7f3a",
                                                 "description": "512 vs 2048", "jobs": []}))
    return root


def test_report_spec_has_the_same_panels_for_the_group(tmp_path: Path, no_wandb_key: None) -> None:
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces import expr

    sweep = load_sweep(_sweep(tmp_path))
    assert sweep_group(sweep) == "context_length-7f3a"
    report = build_wandb_report(sweep, assess_fairness(sweep), entity="lab", project="vicuna-exp",
                                group=sweep_group(sweep))
    assert isinstance(report, wr.Report)
    assert (report.entity, report.project, report.title) == ("lab", "vicuna-exp", "vicuna-exp sweep: context_length")
    assert report.id == ""  # built, not saved
    grids = [b for b in report.blocks if isinstance(b, wr.PanelGrid)]
    assert len(grids) == 1
    (runset,) = grids[0].runsets
    parsed = expr.expr_to_filters(runset.filters)
    assert (parsed.key.section, parsed.key.name, parsed.value) == ("run", "group", "context_length-7f3a")
    lines = [p for p in grids[0].panels if isinstance(p, wr.LinePlot)]
    assert [(p.x, p.y) for p in lines] == [(X_TOKENS, [LOSS]), (X_TOKENS, [EVAL_LOSS])]
    bars = [p for p in grids[0].panels if isinstance(p, wr.BarPlot)]
    assert bars[0].metrics == [TOKENS_PER_S]
    lists = [b for b in report.blocks if isinstance(b, wr.UnorderedList)]
    assert any("trainer.tokens_per_step=4096" in item for item in lists[0].items)
    assert any("context.length differs" in item for item in lists[1].items)


def test_wandb_flag_without_key_exits_2_after_writing_the_local_report(
        tmp_path: Path, no_wandb_key: None, capsys: pytest.CaptureFixture[str]) -> None:
    root = _sweep(tmp_path)
    assert main([str(root), "--wandb"]) == 2
    assert "--wandb needs a wandb API key" in capsys.readouterr().err
    assert (root / "report.html").exists()


def test_wandb_flag_with_a_key_publishes_the_built_report(tmp_path: Path, no_wandb_key: None,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from vicuna_exp.report import wandb_report

    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    published = []

    def fake_publish(report: object) -> str:  # stands in for Report.save(), the only network call
        published.append(report)
        return "https://wandb.example/report"

    monkeypatch.setattr(wandb_report, "publish", fake_publish)
    monkeypatch.setattr(wandb_report, "default_entity", lambda: pytest.fail("entity comes from --entity"))
    assert main([str(_sweep(tmp_path)), "--wandb", "--entity", "lab"]) == 0
    (report,) = published
    assert (report.entity, report.project) == ("lab", "vicuna-exp-test")  # the jobs' logger.project
    assert "wandb Report: https://wandb.example/report" in capsys.readouterr().out
