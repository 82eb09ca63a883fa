"""Question sets and answer files in FastChat's JSONL formats.

Questions: Vicuna-bench lines (`question_id`, `category`, `text` or `turns`) and MT-bench
lines (`question_id`, `category`, `turns`, optional `reference`). Answers:
`question_id`, `answer_id`, `model_id`, `choices: [{index, turns}]`, `tstamp`.
Every defect is reported with its file and line, before any model or judge is touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vicuna_exp.errors import UsageError
from vicuna_exp.eval.jsonl import read_jsonl

QuestionId = int | str


@dataclass(frozen=True)
class Question:
    question_id: QuestionId
    category: str
    turns: tuple[str, ...]
    reference: tuple[str, ...] | None = None  # one reference answer per turn, when given


def sort_key(qid: QuestionId) -> tuple[int, Any]:
    """Ints before strings, each in natural order: FastChat sets use one kind or the other."""
    return (0, qid) if isinstance(qid, int) else (1, str(qid))


def _question_id(obj: dict[str, Any], where: str) -> QuestionId:
    if "question_id" not in obj:
        raise UsageError(f"{where}: missing 'question_id'")
    qid = obj["question_id"]
    if isinstance(qid, bool) or not isinstance(qid, (int, str)) or qid == "":
        raise UsageError(f"{where}: 'question_id' must be an integer or a non-empty string, got {qid!r}")
    return qid


def _strings(value: Any, key: str, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise UsageError(f"{where}: '{key}' must be a non-empty list of strings")
    for j, s in enumerate(value):
        if not isinstance(s, str) or not s.strip():
            raise UsageError(f"{where}: '{key}'[{j}] must be a non-empty string, got {s!r}")
    return tuple(value)


def parse_question(obj: dict[str, Any], where: str) -> Question:
    """One question line, in either FastChat format."""
    qid = _question_id(obj, where)
    category = obj.get("category")
    if not isinstance(category, str) or not category.strip():
        raise UsageError(f"{where}: 'category' must be a non-empty string, got {category!r}")
    if "turns" in obj:
        turns = _strings(obj["turns"], "turns", where)
    elif "text" in obj:
        turns = _strings(obj["text"], "text", where)
    else:
        raise UsageError(f"{where}: needs 'turns' (MT-bench) or 'text' (Vicuna-bench)")
    reference = None
    if obj.get("reference") is not None:
        reference = _strings(obj["reference"], "reference", where)
    return Question(qid, category.strip(), turns, reference)


def load_questions(path: Path, limit: int | None = None) -> list[Question]:
    """All questions of a set, in file order; duplicate ids and empty sets are errors."""
    questions: list[Question] = []
    seen: dict[QuestionId, int] = {}
    for lineno, obj in read_jsonl(path):
        where = f"{path}:{lineno}"
        q = parse_question(obj, where)
        if q.question_id in seen:
            raise UsageError(f"{where}: question_id {q.question_id!r} already used on line {seen[q.question_id]}")
        seen[q.question_id] = lineno
        questions.append(q)
    if not questions:
        raise UsageError(f"{path}: no questions in file")
    if limit is not None:
        if limit < 1:
            raise UsageError(f"eval.limit={limit}: must be at least 1")
        questions = questions[:limit]
    return questions


@dataclass(frozen=True)
class Answer:
    question_id: QuestionId
    model_id: str
    turns: tuple[str, ...]
    record: dict[str, Any]  # the line as written, kept so rewrites preserve unknown fields


def parse_answer(obj: dict[str, Any], where: str) -> Answer:
    qid = _question_id(obj, where)
    model = obj.get("model_id")
    if not isinstance(model, str) or not model:
        raise UsageError(f"{where}: 'model_id' must be a non-empty string")
    choices = obj.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise UsageError(f"{where}: 'choices' must be a non-empty list of {{index, turns}} objects")
    turns = choices[0].get("turns")
    if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
        raise UsageError(f"{where}: 'choices[0].turns' must be a list of strings")
    return Answer(qid, model, tuple(turns), obj)


def load_answers(path: Path, *, lenient: bool = False) -> dict[QuestionId, Answer]:
    """Answers by question id; a later line for the same question wins (a regenerated answer)."""
    answers: dict[QuestionId, Answer] = {}
    for lineno, obj in read_jsonl(path, lenient=lenient):
        a = parse_answer(obj, f"{path}:{lineno}")
        answers[a.question_id] = a
    return answers


def attach_references(questions: list[Question], answers_path: Path | None) -> list[Question]:
    """Questions with references from a FastChat answer file (e.g. gpt-4 answers), where given.

    A reference in the file overrides one in the question set: the file is the explicit choice.
    """
    if answers_path is None:
        return questions
    refs = load_answers(answers_path)
    return [
        Question(q.question_id, q.category, q.turns, refs[q.question_id].turns)
        if q.question_id in refs and refs[q.question_id].turns
        else q
        for q in questions
    ]
