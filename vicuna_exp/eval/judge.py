"""`vicuna-exp eval judge`: grade answers with an LLM judge, MT-bench style.

    vicuna-exp eval judge eval.run_dir=RUN eval.judge.base_url=https://api.openai.com/v1 eval.judge.model=gpt-4
    vicuna-exp eval judge eval.run_dir=RUN eval.judge.mode=pairwise eval.judge.baseline_model=gpt-3.5-turbo ...

Single mode rates every answer 1-10 (each turn separately; the second turn sees the whole
conversation). Pairwise mode compares two models' answers, twice, in both orders; when the
two verdicts disagree the pair is a tie. Everything is checked (endpoint, key, questions,
answers, prompts) before the first request. Replies go through a local cache, so a rerun
pays only for what is new. Exit 0 when every item was graded, 1 when some could not be
(they are listed, and everything else is kept).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from vicuna_exp.errors import EXIT_FAILED, EXIT_OK, UsageError
from vicuna_exp.eval.cache import JudgmentCache, cache_key
from vicuna_exp.eval.client import ChatClient, JudgeRequestError, resolve_endpoint
from vicuna_exp.eval.config import EvalPaths, JudgeMode, absolute_path, resolve_paths, safe_name
from vicuna_exp.eval.jsonl import read_jsonl, write_jsonl_atomic
from vicuna_exp.eval.prompts import JudgePrompt, PromptSet, load_prompt_set, prompt_path
from vicuna_exp.eval.questions import (
    Answer,
    Question,
    QuestionId,
    attach_references,
    load_answers,
    load_questions,
)
from vicuna_exp.eval.verdicts import UNPARSEABLE_SCORE, parse_rating, parse_verdict, winner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    """One call to the judge."""

    prompt: JudgePrompt
    messages: list[dict[str, str]]
    key: str

    @property
    def user_prompt(self) -> str:
        return self.messages[-1]["content"]


@dataclass
class Item:
    """One thing to grade: a (question, turn) of one model, or of a pair of models."""

    question_id: QuestionId
    models: tuple[str, ...]  # (model,) in single mode; (model_1, model_2) in pairwise
    turn: int
    requests: tuple[Request, ...] = ()  # single: one; pairwise: (A=model_1, A=model_2)
    missing: str | None = None  # why it cannot be judged at all (no answer)

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.question_id, tuple(sorted(self.models)), self.turn)


@dataclass
class Outcome:
    rows: list[dict[str, Any]] = field(default_factory=list)  # judgment lines, unparseable ones included
    ungraded: list[dict[str, Any]] = field(default_factory=list)  # items without a judgment, with a reason
    unparseable: int = 0


# ---------------------------------------------------------------- building the work


def _request(judge_model: str, prompt: JudgePrompt, fields: dict[str, str], sampling: dict[str, Any]) -> Request:
    messages = prompt.messages(**fields)
    return Request(prompt, messages, cache_key(judge_model, prompt.name, messages, **sampling))


def _ref_fields(q: Question, turn: int, categories: Iterable[str]) -> dict[str, str] | None:
    """Reference answers for this turn when the category is graded against one and it exists."""
    if q.category not in categories or q.reference is None or len(q.reference) < turn:
        return None
    return {f"ref_answer_{i + 1}": r for i, r in enumerate(q.reference[:2])}


def _answer_text(a: Answer | None, turn: int) -> str | None:
    return a.turns[turn - 1] if a is not None and len(a.turns) >= turn else None


def single_items(
    questions: list[Question], answers: dict[str, dict[QuestionId, Answer]], prompts: PromptSet,
    judge_model: str, ref_categories: list[str], sampling: dict[str, Any],
) -> list[Item]:
    items = []
    for model, by_q in answers.items():
        for q in questions:
            a = by_q.get(q.question_id)
            for turn in range(1, len(q.turns) + 1):
                if _answer_text(a, turn) is None:
                    items.append(Item(q.question_id, (model,), turn, missing=f"no answer for turn {turn}"))
                    continue
                ref = _ref_fields(q, turn, ref_categories)
                fields = {"question": q.turns[0], "answer": a.turns[0], **(ref or {})}
                if turn == 2:
                    fields.update(question_1=q.turns[0], question_2=q.turns[1], answer_1=a.turns[0], answer_2=a.turns[1])
                req = _request(judge_model, prompts.pick(turn, ref is not None), fields, sampling)
                items.append(Item(q.question_id, (model,), turn, (req,)))
    return items


def pair_items(
    questions: list[Question], answers: dict[str, dict[QuestionId, Answer]], pairs: list[tuple[str, str]],
    prompts: PromptSet, judge_model: str, ref_categories: list[str], sampling: dict[str, Any],
) -> list[Item]:
    items = []
    for m1, m2 in pairs:
        for q in questions:
            a1, a2 = answers[m1].get(q.question_id), answers[m2].get(q.question_id)
            for turn in range(1, len(q.turns) + 1):
                lacking = [m for m, a in ((m1, a1), (m2, a2)) if _answer_text(a, turn) is None]
                if lacking:
                    items.append(Item(q.question_id, (m1, m2), turn, missing=f"no answer for turn {turn} from {', '.join(lacking)}"))
                    continue
                ref = _ref_fields(q, turn, ref_categories)
                prompt = prompts.pick(turn, ref is not None)
                reqs = []
                for a, b in ((a1, a2), (a2, a1)):  # game 1: A = model_1; game 2: A = model_2
                    fields = {"question": q.turns[0], "answer_a": a.turns[0], "answer_b": b.turns[0], **(ref or {})}
                    if turn == 2:
                        fields.update(question_1=q.turns[0], question_2=q.turns[1], answer_a_1=a.turns[0],
                                      answer_a_2=a.turns[1], answer_b_1=b.turns[0], answer_b_2=b.turns[1])
                    reqs.append(_request(judge_model, prompt, fields, sampling))
                items.append(Item(q.question_id, (m1, m2), turn, tuple(reqs)))
    return items


def model_pairs(models: list[str], baseline: str | None) -> list[tuple[str, str]]:
    """Each model against the baseline, or every pair when there is none."""
    if baseline:
        return [(m, baseline) for m in models if m != baseline]
    return list(combinations(sorted(models), 2))


# ---------------------------------------------------------------- asking the judge


def fetch_all(requests: list[Request], client: Any, cache: JudgmentCache, concurrency: int,
              judge_model: str) -> tuple[dict[str, str], dict[str, str]]:
    """Replies and errors by request key. Cached replies cost nothing; new ones are cached at once."""
    unique = {r.key: r for r in requests}
    replies: dict[str, str] = {}
    errors: dict[str, str] = {}
    todo = []
    for key, req in unique.items():
        hit = cache.get(key)
        if hit is None:
            todo.append(req)
        else:
            replies[key] = hit
    if todo:
        log.info("judge: %d requests to send (%d answered from the cache)", len(todo), len(replies))

    def one(req: Request) -> str:
        reply = client.complete(req.messages)
        cache.put(req.key, reply, judge_model=judge_model, prompt_name=req.prompt.name)
        return reply

    pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="judge")
    try:
        futures = {pool.submit(one, req): req.key for req in todo}
        step = max(1, len(futures) // 10)
        for done, fut in enumerate(as_completed(futures), 1):
            key = futures[fut]
            try:
                replies[key] = fut.result()
            except JudgeRequestError as e:
                errors[key] = str(e)
            if done % step == 0 or done == len(futures):
                log.info("judge: %d/%d requests done, %d failed", done, len(futures), len(errors))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return replies, errors


def assemble(items: list[Item], mode: JudgeMode, replies: dict[str, str], errors: dict[str, str],
             judge_model: str) -> Outcome:
    """Judgment lines in FastChat's formats, and the items left ungraded."""
    out = Outcome()
    now = time.time()
    for it in items:
        ident = {"question_id": it.question_id, "turn": it.turn}
        ident.update({"model": it.models[0]} if mode is JudgeMode.single else
                     {"model_1": it.models[0], "model_2": it.models[1]})
        failed = [errors.get(r.key, "no reply") for r in it.requests if r.key not in replies]
        if it.missing or failed:
            out.ungraded.append({**ident, "reason": it.missing or failed[0]})
            continue
        judge = [judge_model, it.requests[0].prompt.name]
        if mode is JudgeMode.single:
            req = it.requests[0]
            rating = parse_rating(replies[req.key])
            out.unparseable += rating is None
            out.rows.append({"question_id": it.question_id, "model": it.models[0], "judge": judge,
                             "user_prompt": req.user_prompt, "judgment": replies[req.key],
                             "score": UNPARSEABLE_SCORE if rating is None else rating,
                             "turn": it.turn, "tstamp": now})
        else:
            g1, g2 = it.requests
            w1 = winner(parse_verdict(replies[g1.key]), a_is_model_1=True)
            w2 = winner(parse_verdict(replies[g2.key]), a_is_model_1=False)
            out.unparseable += "error" in (w1, w2)
            out.rows.append({"question_id": it.question_id, "model_1": it.models[0], "model_2": it.models[1],
                             "g1_winner": w1, "g2_winner": w2, "judge": judge,
                             "g1_user_prompt": g1.user_prompt, "g1_judgment": replies[g1.key],
                             "g2_user_prompt": g2.user_prompt, "g2_judgment": replies[g2.key],
                             "turn": it.turn, "tstamp": now})
    return out


# ---------------------------------------------------------------- files


def _row_key(row: dict[str, Any]) -> tuple[Any, ...]:
    models = (row["model"],) if "model" in row else (row["model_1"], row["model_2"])
    return (row["question_id"], tuple(sorted(models)), row["turn"])


def merge_rows(path: Path, attempted: set[tuple[Any, ...]], new_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Earlier lines for items not attempted now, then this run's lines: judging one model
    later never erases another's judgments, and a re-judged item never appears twice."""
    old = [row for _, row in read_jsonl(path)] if path.is_file() else []
    kept = [row for row in old if _row_key(row) not in attempted]
    return kept + new_rows


def ungraded_file(paths: EvalPaths, judge_model: str, mode: JudgeMode) -> Path:
    f = paths.judgments_file(judge_model, mode)
    return f.with_name(f.stem + "_ungraded.jsonl")


def discover_models(paths: EvalPaths, wanted: list[str]) -> list[str]:
    """Answer files to judge: the ones named, or all in model_answer/."""
    if wanted:
        names = [safe_name(m) for m in wanted]
        missing = [m for m, n in zip(wanted, names, strict=True) if not paths.answers_file(n).is_file()]
        if missing:
            raise UsageError(f"eval.judge.models: no answers for {', '.join(missing)} in {paths.answers_dir}")
        return names
    found = sorted(p.stem for p in paths.answers_dir.glob("*.jsonl")) if paths.answers_dir.is_dir() else []
    if not found:
        raise UsageError(f"{paths.answers_dir}: no answer files; run `vicuna-exp eval generate` first")
    return found


# ---------------------------------------------------------------- the task


def _check_limits(jc: Any) -> None:
    for key, ok, need in (("concurrency", jc.concurrency >= 1, ">= 1"), ("max_retries", jc.max_retries >= 0, ">= 0"),
                          ("timeout_s", jc.timeout_s > 0, "> 0"), ("backoff_s", jc.backoff_s >= 0, ">= 0")):
        if not ok:
            raise UsageError(f"eval.judge.{key}={jc[key]}: must be {need}")


def main(cfg: DictConfig) -> int:
    """Check everything, ask the judge what the cache does not know, write judgments."""
    ev, jc = cfg.eval, cfg.eval.judge
    endpoint = resolve_endpoint(jc)
    paths = resolve_paths(cfg)
    questions = load_questions(paths.questions, ev.limit)
    questions = attach_references(questions, absolute_path(jc.reference_answers) if jc.reference_answers else None)
    ppath = prompt_path(jc)
    prompts = load_prompt_set(ppath, jc.mode)
    prompts.check_turns(max(len(q.turns) for q in questions), ppath)
    _check_limits(jc)

    models = discover_models(paths, list(jc.models))
    baseline = safe_name(jc.baseline_model) if jc.baseline_model else None
    if jc.mode is JudgeMode.pairwise:
        if baseline and baseline not in models:
            if not paths.answers_file(baseline).is_file():
                raise UsageError(f"eval.judge.baseline_model={jc.baseline_model}: no {paths.answers_file(baseline)}")
            models.append(baseline)
        pairs = model_pairs(models, baseline)
        if not pairs:
            raise UsageError(f"pairwise judging needs two models with answers in {paths.answers_dir}; found {models}")
    answers = {m: load_answers(paths.answers_file(m)) for m in models}

    sampling = {"temperature": float(jc.temperature), "max_tokens": int(jc.max_tokens)}
    refs = list(jc.reference_categories)
    if jc.mode is JudgeMode.single:
        items = single_items(questions, answers, prompts, endpoint.model, refs, sampling)
    else:
        items = pair_items(questions, answers, pairs, prompts, endpoint.model, refs, sampling)
    no_ref = sorted({q.question_id for q in questions if q.category in refs and q.reference is None}, key=str)
    if no_ref and prompts.has_reference_prompts():
        log.warning("judge: %d questions in reference categories have no reference answer; graded without: %s",
                    len(no_ref), no_ref[:10])

    cache = JudgmentCache(absolute_path(jc.cache_path) if jc.cache_path else paths.out_dir / "judge_cache.jsonl")
    requests = [r for it in items for r in it.requests]
    with ChatClient(endpoint, timeout_s=jc.timeout_s, max_retries=jc.max_retries, backoff_s=jc.backoff_s,
                    max_backoff_s=jc.max_backoff_s, temperature=jc.temperature, max_tokens=jc.max_tokens,
                    concurrency=jc.concurrency) as client:
        replies, errors = fetch_all(requests, client, cache, jc.concurrency, endpoint.model)
        sent = client.requests_sent
    outcome = assemble(items, jc.mode, replies, errors, endpoint.model)

    attempted = {it.key for it in items}
    jfile = paths.judgments_file(endpoint.model, jc.mode)
    write_jsonl_atomic(jfile, merge_rows(jfile, attempted, outcome.rows))
    ufile = ungraded_file(paths, endpoint.model, jc.mode)
    write_jsonl_atomic(ufile, merge_rows(ufile, attempted, outcome.ungraded))

    graded = len(outcome.rows) - outcome.unparseable
    print(f"judged {len(items)} items of {len(models)} model(s) with {endpoint.model} ({prompts.config} prompts): "
          f"{graded} graded, {outcome.unparseable} unparseable, {len(outcome.ungraded)} not judged; "
          f"{sent} HTTP requests, {cache.hits} replies from the cache")
    print(f"judgments: {jfile}")
    return _list_ungraded(outcome, jfile, ufile)


def _list_ungraded(outcome: Outcome, jfile: Path, ufile: Path) -> int:
    bad = [(_describe(r), r["reason"]) for r in outcome.ungraded]
    bad += [(_describe(r), "unparseable judgment") for r in outcome.rows
            if r.get("score") == UNPARSEABLE_SCORE or "error" in (r.get("g1_winner"), r.get("g2_winner"))]
    if not bad:
        return EXIT_OK
    print(f"{len(bad)} item(s) ungraded (unparseable ones are in {jfile.name} with score -1 / winner 'error'; "
          f"the others in {ufile.name}):")
    for what, why in bad[:50]:
        print(f"  {what}: {why}")
    if len(bad) > 50:
        print(f"  ... and {len(bad) - 50} more")
    return EXIT_FAILED


def _describe(row: dict[str, Any]) -> str:
    who = row.get("model") or f"{row.get('model_1')} vs {row.get('model_2')}"
    return f"question {row['question_id']} turn {row['turn']} ({who})"
