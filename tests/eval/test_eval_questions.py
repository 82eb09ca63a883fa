"""Question sets and answer files in FastChat's formats: what loads, and what is refused (with the line)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vicuna_exp.errors import UsageError
from vicuna_exp.eval.config import DEFAULT_QUESTIONS, PACKAGED_QUESTIONS_DIR, EvalPaths, JudgeMode, bench_name
from vicuna_exp.eval.questions import attach_references, load_answers, load_questions


def _file(tmp_path: Path, *lines: str, name: str = "q.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_packaged_sets_load() -> None:
    mt = load_questions(DEFAULT_QUESTIONS)
    assert len(mt) == 16 and all(len(q.turns) == 2 for q in mt)
    assert {q.category for q in mt} == {"writing", "roleplay", "extraction", "math", "reasoning", "coding",
                                        "stem", "humanities"}
    assert all(q.reference and len(q.reference) == 2 for q in mt if q.category in ("math", "reasoning", "coding"))
    vicuna = load_questions(PACKAGED_QUESTIONS_DIR / "vx_vicuna_bench.jsonl")
    assert len(vicuna) == 10 and all(len(q.turns) == 1 for q in vicuna)
    assert load_questions(DEFAULT_QUESTIONS, limit=3) == mt[:3]


def test_both_fastchat_formats(tmp_path: Path) -> None:
    path = _file(
        tmp_path,
        json.dumps({"question_id": 1, "category": "generic", "text": "How are you?"}),  # Vicuna-bench
        "",
        json.dumps({"question_id": 81, "category": "math", "turns": ["a?", "b?"], "reference": ["A", "B"]}),
        json.dumps({"question_id": "arena-7", "category": "coding", "turns": ["c?"]}),
    )
    qs = load_questions(path)
    assert [(q.question_id, q.turns, q.reference) for q in qs] == [
        (1, ("How are you?",), None), (81, ("a?", "b?"), ("A", "B")), ("arena-7", ("c?",), None)]


@pytest.mark.parametrize(("line", "error"), [
    ('{"question_id": 2, "category": "x", "turns": ["a"]', r"q.jsonl:2: not valid JSON"),
    ('[1, 2]', r"q.jsonl:2: expected a JSON object"),
    ('{"category": "x", "turns": ["a"]}', r"q.jsonl:2: missing 'question_id'"),
    ('{"question_id": true, "category": "x", "turns": ["a"]}', r"q.jsonl:2: 'question_id' must be"),
    ('{"question_id": 2, "turns": ["a"]}', r"q.jsonl:2: 'category' must be a non-empty string"),
    ('{"question_id": 2, "category": "x"}', r"q.jsonl:2: needs 'turns' \(MT-bench\) or 'text'"),
    ('{"question_id": 2, "category": "x", "turns": []}', r"q.jsonl:2: 'turns' must be a non-empty list"),
    ('{"question_id": 2, "category": "x", "turns": ["a", 3]}', r"q.jsonl:2: 'turns'\[1\] must be a non-empty string"),
    ('{"question_id": 2, "category": "x", "turns": ["a"], "reference": [""]}', r"q.jsonl:2: 'reference'\[0\]"),
    ('{"question_id": 1, "category": "x", "turns": ["a"]}', r"q.jsonl:2: question_id 1 already used on line 1"),
])
def test_malformed_question_files_name_the_line(tmp_path: Path, line: str, error: str) -> None:
    path = _file(tmp_path, json.dumps({"question_id": 1, "category": "x", "turns": ["ok"]}), line)
    with pytest.raises(UsageError, match=error):
        load_questions(path)


def test_empty_or_missing_files(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no questions"):
        load_questions(_file(tmp_path, ""))
    with pytest.raises(UsageError, match="no such file"):
        load_questions(tmp_path / "nope.jsonl")
    with pytest.raises(UsageError, match="eval.limit=0"):
        load_questions(DEFAULT_QUESTIONS, limit=0)


def test_answers_and_reference_answers(tmp_path: Path) -> None:
    rec = {"question_id": 81, "answer_id": "x", "model_id": "gpt-4", "choices": [{"index": 0, "turns": ["A1", "B1"]}],
           "tstamp": 0}
    path = _file(tmp_path, json.dumps(rec), json.dumps({**rec, "choices": [{"index": 0, "turns": ["A2", "B2"]}]}),
                 name="gpt-4.jsonl")
    assert load_answers(path)[81].turns == ("A2", "B2")  # a later line wins
    qs = load_questions(_file(tmp_path, json.dumps({"question_id": 81, "category": "math", "turns": ["a", "b"]}),
                              json.dumps({"question_id": 82, "category": "math", "turns": ["c"]})))
    with_refs = attach_references(qs, path)
    assert with_refs[0].reference == ("A2", "B2") and with_refs[1].reference is None
    bad = _file(tmp_path, json.dumps({**rec, "choices": [{"index": 0, "turns": "A"}]}), name="bad.jsonl")
    with pytest.raises(UsageError, match=r"bad.jsonl:1: 'choices\[0\].turns' must be a list"):
        load_answers(bad)


def test_layout_follows_fastchat(tmp_path: Path) -> None:
    assert bench_name(Path("data/mt_bench/question.jsonl")) == "mt_bench"
    assert bench_name(Path("sets/my_set.jsonl")) == "my_set"
    paths = EvalPaths(out_dir=tmp_path, bench="mt_bench", questions=Path("q.jsonl"))
    assert paths.answers_file("lmsys/vicuna-7b") == tmp_path / "mt_bench/model_answer/lmsys--vicuna-7b.jsonl"
    assert paths.judgments_file("gpt-4", JudgeMode.single) == tmp_path / "mt_bench/model_judgment/gpt-4_single.jsonl"
    assert paths.judgments_file("gpt-4", JudgeMode.pairwise).name == "gpt-4_pair.jsonl"
