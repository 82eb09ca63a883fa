"""Aggregation arithmetic on hand-made judgments, the report files, and the sweep-report summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from vicuna_exp.errors import UsageError
from vicuna_exp.eval import report as report_mod
from vicuna_exp.eval.aggregate import relative_total, single_scores, win_rates
from vicuna_exp.eval.config import EvalConfig

CATEGORIES = {1: "writing", 2: "math", 3: "generic"}
QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["q1a", "q1b"]},
    {"question_id": 2, "category": "math", "turns": ["q2a", "q2b"], "reference": ["r1", "r2"]},
    {"question_id": 3, "category": "generic", "text": "q3"},
]


def s(model: str, qid: int, turn: int, score: float) -> dict:
    return {"question_id": qid, "model": model, "judge": ["judge-x", "single-v1"], "user_prompt": "...",
            "judgment": f"Rating: [[{score}]]", "score": score, "turn": turn, "tstamp": 0.0}


def p(m1: str, m2: str, qid: int, turn: int, g1: str, g2: str) -> dict:
    return {"question_id": qid, "model_1": m1, "model_2": m2, "g1_winner": g1, "g2_winner": g2,
            "judge": ["judge-x", "pair-v2"], "g1_user_prompt": "", "g1_judgment": "", "g2_user_prompt": "",
            "g2_judgment": "", "turn": turn, "tstamp": 0.0}


SINGLE = [
    s("alpha", 1, 1, 8), s("alpha", 1, 2, 6), s("alpha", 2, 1, 9), s("alpha", 2, 2, -1), s("alpha", 3, 1, 5),
    s("gpt", 1, 1, 10), s("gpt", 1, 2, 8), s("gpt", 2, 1, 9), s("gpt", 2, 2, 7), s("gpt", 3, 1, -1),
]
PAIRS = [
    p("alpha", "gpt", 1, 1, "model_1", "model_1"),  # alpha wins
    p("alpha", "gpt", 1, 2, "model_2", "model_2"),  # alpha loses
    p("alpha", "gpt", 2, 1, "model_1", "model_2"),  # the orders disagree: tie
    p("alpha", "gpt", 2, 2, "tie", "tie"),
    p("alpha", "gpt", 3, 1, "error", "model_1"),  # unparseable: not counted
    p("gpt", "beta", 1, 1, "model_2", "model_2"),  # beta (model_2) wins
]


def test_single_score_arithmetic() -> None:
    scores = single_scores(SINGLE, CATEGORIES)
    a = scores["alpha"]
    assert a.overall.value == pytest.approx((8 + 6 + 9 + 5) / 4) and a.overall.n == 4 and a.unparseable == 1
    assert a.by_turn[1].value == pytest.approx((8 + 9 + 5) / 3) and a.by_turn[2].value == 6
    assert {c: m.value for c, m in a.by_category.items()} == {"writing": 7.0, "math": 9.0, "generic": 5.0}
    # relative total: only items both were graded on (q2 turn 2 and q3 are unparseable for one side)
    ratio, n = relative_total(SINGLE, "alpha", "gpt")
    assert n == 3 and ratio == pytest.approx((8 + 6 + 9) / (10 + 8 + 9))
    assert relative_total(SINGLE, "alpha", "nobody") == (None, 0)


def test_win_rate_arithmetic() -> None:
    rec = win_rates(PAIRS, CATEGORIES, baseline="gpt")
    assert set(rec) == {"alpha", "beta"}  # the baseline gets no row of its own
    a = rec["alpha"].overall
    assert (a.win, a.loss, a.tie, rec["alpha"].unparseable) == (1, 1, 2, 1)
    assert a.win_rate == 0.25 and a.loss_rate == 0.25 and a.adjusted == pytest.approx((1 + 0.5 * 2) / 4)
    assert rec["alpha"].by_category["writing"].adjusted == 0.5 and rec["alpha"].by_category["math"].tie == 2
    assert rec["beta"].overall.adjusted == 1.0  # as model_2, it won
    everyone = win_rates(PAIRS, CATEGORIES)
    g = everyone["gpt"].overall
    assert (g.win, g.loss, g.tie) == (1, 2, 2) and everyone["gpt"].opponents == {"alpha", "beta"}


def _run_dir(tmp_path: Path, single: list[dict], pairs: list[dict] | None = None) -> Path:
    run = tmp_path / "run"
    bench = run / "eval" / "qs"
    (bench / "model_judgment").mkdir(parents=True)
    (bench / "model_answer").mkdir()
    (tmp_path / "qs.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (bench / "model_judgment" / "judge-x_single.jsonl").write_text("".join(json.dumps(r) + "\n" for r in single))
    if pairs:
        (bench / "model_judgment" / "judge-x_pair.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    (bench / "generation.json").write_text(json.dumps({"model_id": "alpha"}))
    return run


def _cfg(tmp_path: Path, run: Path, **ev: object):
    cfg = OmegaConf.create({"eval": OmegaConf.structured(EvalConfig)})
    cfg.eval.run_dir, cfg.eval.questions = str(run), str(tmp_path / "qs.jsonl")
    for k, v in ev.items():
        OmegaConf.update(cfg, f"eval.{k}", v)
    return cfg


def test_report_writes_table_markdown_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    clean = [r for r in SINGLE if r["score"] != -1]
    run = _run_dir(tmp_path, clean, [r for r in PAIRS if "error" not in (r["g1_winner"], r["g2_winner"])])
    assert report_mod.main(_cfg(tmp_path, run, reference_model="gpt", **{"judge.baseline_model": "gpt"})) == 0
    out = capsys.readouterr().out
    bench = run / "eval" / "qs"
    for f in ("report.md", "scores.json", "report.png"):
        assert (bench / f).stat().st_size > 0, f
    assert (bench / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    scores = json.loads((bench / "scores.json").read_text())
    single = scores["judgments"]["judge-x_single.jsonl"]["models"]
    assert single["alpha"]["score"] == pytest.approx(7.0) and single["gpt"]["score"] == pytest.approx(8.5)
    assert single["alpha"]["relative_score"] == pytest.approx(23 / 27)
    assert single["alpha"]["categories"] == {"generic": 5.0, "math": 9.0, "writing": 7.0}
    pair = scores["judgments"]["judge-x_pair.jsonl"]
    assert pair["baseline"] == "gpt" and pair["models"]["alpha"]["win_rate_adjusted"] == 0.5
    assert "85.2%" in out and "(reference)" in out and "adjusted win rate" in out
    md = (bench / "report.md").read_text()
    assert "| alpha | 7.00 |" in md and "## judge-x_pair.jsonl" in md


def test_report_lists_ungraded_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = _run_dir(tmp_path, SINGLE, PAIRS)
    ufile = run / "eval" / "qs" / "model_judgment" / "judge-x_single_ungraded.jsonl"
    ufile.write_text(json.dumps({"question_id": 3, "model": "beta", "turn": 1, "reason": "HTTP 500"}) + "\n")
    assert report_mod.main(_cfg(tmp_path, run)) == 1
    out = capsys.readouterr().out
    assert "4 item(s) ungraded" in out
    assert "question 2 turn 2 (alpha): unparseable judgment" in out
    assert "question 3 turn 1 (alpha vs gpt): unparseable judgment" in out
    assert "question 3 turn 1 (beta): HTTP 500" in out


def test_report_without_questions_finds_every_judged_set(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`eval report eval.run_dir=RUN` alone reports the sets that were judged, with the categories
    of the question file each was generated from, not the packaged set (which has no judgments)."""
    run = _run_dir(tmp_path, [r for r in SINGLE if r["score"] != -1])
    record = run / "eval" / "qs" / "generation.json"
    record.write_text(json.dumps({"model_id": "alpha", "questions": str(tmp_path / "qs.jsonl")}))
    (run / "eval" / "unjudged" / "model_answer").mkdir(parents=True)  # answered, never judged: not reported
    cfg = _cfg(tmp_path, run)
    cfg.eval.questions = None
    assert report_mod.main(cfg) == 0
    scores = json.loads((run / "eval" / "qs" / "scores.json").read_text())
    assert scores["bench"] == "qs" and scores["questions"] == str(tmp_path / "qs.jsonl")
    assert scores["judgments"]["judge-x_single.jsonl"]["models"]["alpha"]["categories"] == {
        "generic": 5.0, "math": 9.0, "writing": 7.0}
    assert not (run / "eval" / "unjudged" / "scores.json").exists()
    assert "judge-x_single.jsonl" in capsys.readouterr().out


def test_report_without_judgments_is_bad_input(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, [])
    (run / "eval" / "qs" / "model_judgment" / "judge-x_single.jsonl").unlink()
    with pytest.raises(UsageError, match="no judgment files"):
        report_mod.main(_cfg(tmp_path, run))


def test_summarize_run_eval_for_the_sweep_report(tmp_path: Path) -> None:
    assert report_mod.summarize_run_eval(tmp_path) is None  # never evaluated
    run = _run_dir(tmp_path, SINGLE, PAIRS)
    summary = report_mod.summarize_run_eval(run)
    assert summary == {"qs/score": pytest.approx(7.0), "qs/win_rate_adjusted": 0.5, "qs/ungraded": 2}
    # after `eval report` named a reference model, its relative score joins
    report_mod.main(_cfg(tmp_path, run, reference_model="gpt"))
    assert report_mod.summarize_run_eval(run)["qs/relative_score"] == pytest.approx(23 / 27)
    # a damaged file is skipped, never raised
    (run / "eval" / "qs" / "model_judgment" / "judge-x_single.jsonl").write_text("{not json\n")
    assert "qs/score" not in (report_mod.summarize_run_eval(run) or {})
