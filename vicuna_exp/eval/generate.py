"""`vicuna-exp eval generate`: answer a question set with a trained model, as FastChat answer JSONL.

    vicuna-exp eval generate eval.run_dir=outputs/runs/DATE/TIME            # RUN_DIR/final
    vicuna-exp eval generate model.path=/models/vicuna-7b eval.out_dir=evals/vicuna-7b

Prompts are rendered with the conversation template the model was trained with (the run's
recorded `template`, else `cfg.template`) by the same code training uses, so the model sees at
inference exactly the text it was trained to continue. Generation is batched with left padding;
questions are grouped by their category's temperature (0 = greedy); a second turn sees the
model's own first answer. Answers are appended after every batch, so an interrupted run
resumes where it stopped.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vicuna_exp.choices import Device, EvalDtype
from vicuna_exp.errors import EXIT_FAILED, EXIT_OK, UsageError
from vicuna_exp.eval.client import resolve_endpoint
from vicuna_exp.eval.config import (
    absolute_path,
    model_id,
    model_source,
    resolve_paths,
    run_dir,
    select,
    temperature_for,
)
from vicuna_exp.eval.jsonl import append_jsonl, write_json_atomic, write_jsonl_atomic
from vicuna_exp.eval.questions import Question, load_answers, load_questions, sort_key

log = logging.getLogger(__name__)

GREEDY_BELOW = 1e-4  # a temperature this small means greedy decoding (FastChat's threshold)


@dataclass
class Pending:
    """A question being answered: the turns answered so far."""

    question: Question
    answers: list[str]
    failed: str | None = None  # why it could not be finished (e.g. prompt longer than the context)


def training_template(cfg: DictConfig) -> tuple[Any, str]:
    """The template the model was trained with: the run's recorded one, else `cfg.template`."""
    from vicuna_exp.data.config import TemplateConfig

    base = OmegaConf.structured(TemplateConfig)
    if cfg.eval.run_dir:
        recorded = run_dir(cfg) / ".hydra" / "config.yaml"
        if recorded.is_file():
            node = OmegaConf.select(OmegaConf.load(recorded), "template")
            if node is not None:
                template = OmegaConf.merge(base, node)
                if OmegaConf.is_missing(template, "special_tokens"):  # recorded before the key: none
                    template.special_tokens = []
                return template, f"{recorded} (template.name={node.get('name')})"
    if "template" not in cfg:
        raise UsageError("template: no conversation template in the config")
    return OmegaConf.merge(base, cfg.template), f"the config's template ({cfg.template.name})"


def conversation(q: Question, answers: list[str], upto: int) -> list[dict[str, str]]:
    """Chat messages for turn `upto` (0-based): earlier turns with the model's own answers."""
    msgs: list[dict[str, str]] = []
    for i in range(upto + 1):
        msgs.append({"role": "user", "content": q.turns[i]})
        if i < upto:
            msgs.append({"role": "assistant", "content": answers[i]})
    return msgs


def adapter_source(cfg: DictConfig) -> tuple[Path, Path] | None:
    """(base model dir, adapter dir) when `eval.adapter` is set: the base is model.path, which must be
    the base the adapter was trained on, or that base itself when model.path is unset."""
    from vicuna_exp.finetune import adapter_base, check_adapter_base

    if not cfg.eval.adapter:
        return None
    adapter = absolute_path(str(cfg.eval.adapter))
    if not (adapter / "adapter_config.json").is_file():
        raise UsageError(f"eval.adapter={cfg.eval.adapter}: not a peft adapter dir (no adapter_config.json)")
    path = select(cfg, "model.path")
    check_adapter_base(adapter, str(path) if path else None)
    base = str(path) if path else adapter_base(adapter)
    if not base:
        raise UsageError(f"eval.adapter={cfg.eval.adapter}: the adapter names no base (a random-init run); "
                         "answer with the merged model instead (eval.run_dir, or model.path=RUN_DIR/final)")
    src = absolute_path(base)
    if not (src / "config.json").is_file():
        raise UsageError(f"model.path={base}: not a Hugging Face model dir (no config.json)")
    return src, adapter


def load_model(src: Path, tokenizer_dir: Path, device: str, dtype: EvalDtype,
               adapter: Path | None = None) -> tuple[Any, Any, Any]:
    """(model, tokenizer, device) from local files only; with `adapter`, the peft adapter on `src`."""
    import torch
    from transformers import AutoModelForCausalLM

    from vicuna_exp.data.tokenizer import load_tokenizer

    if device == Device.auto:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == EvalDtype.auto:
        dtype = EvalDtype.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else EvalDtype.float32
    torch_dtype = {EvalDtype.float32: torch.float32, EvalDtype.bfloat16: torch.bfloat16,
                   EvalDtype.float16: torch.float16}[EvalDtype(dtype)]
    tokenizer = load_tokenizer(str(tokenizer_dir), key="model.tokenizer")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch_dtype, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UsageError(f"{src}: cannot load a causal LM ({str(e).splitlines()[0]})") from None
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    model.to(device).eval()
    return model, tokenizer, torch.device(device)


def generate_batch(model: Any, tokenizer: Any, device: Any, prompts: list[str], temperature: float,
                   max_new_tokens: int) -> list[str | None]:
    """Continue each prompt; None for a prompt that leaves no room in the model's context."""
    import torch
    from transformers import GenerationConfig

    from vicuna_exp.data.tokenizer import pad_id

    ids = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    limit = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
    fits = [i for i, x in enumerate(ids) if limit is None or len(x) < limit]
    out: list[str | None] = [None] * len(prompts)
    if not fits:
        return out
    width = max(len(ids[i]) for i in fits)
    new_tokens = max_new_tokens if limit is None else min(max_new_tokens, limit - width)
    pad = pad_id(tokenizer)
    input_ids = torch.full((len(fits), width), pad, dtype=torch.long)
    mask = torch.zeros((len(fits), width), dtype=torch.long)
    for row, i in enumerate(fits):  # left padding: every prompt ends where generation starts
        input_ids[row, width - len(ids[i]):] = torch.tensor(ids[i])
        mask[row, width - len(ids[i]):] = 1
    sample = temperature >= GREEDY_BELOW
    gen_cfg = GenerationConfig(
        max_new_tokens=new_tokens, do_sample=sample, temperature=temperature if sample else None,
        top_p=None, top_k=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad,
    )
    with torch.inference_mode():
        seqs = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg)
    eos = tokenizer.eos_token_id
    for row, i in enumerate(fits):
        new = seqs[row, width:].tolist()
        if eos in new:
            new = new[: new.index(eos)]  # stop at </s>
        out[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
    return out


def answer_questions(model: Any, tokenizer: Any, device: Any, template: Any, todo: list[Question],
                     cfg: DictConfig, on_done: Any) -> list[Pending]:
    """Answer every turn of every question, batch by batch; `on_done(pending)` per finished question."""
    from vicuna_exp.data.template import render_prompt

    ev = cfg.eval
    by_temp: dict[float, list[Question]] = defaultdict(list)
    for q in todo:
        by_temp[temperature_for(cfg, q.category)].append(q)
    finished: list[Pending] = []
    total, started = len(todo), time.monotonic()
    for temp, group in sorted(by_temp.items()):
        group.sort(key=lambda q: len(q.turns[0]))  # similar lengths share a batch: less padding
        for start in range(0, len(group), ev.batch_size):
            batch = [Pending(q, []) for q in group[start:start + ev.batch_size]]
            for turn in range(max(len(p.question.turns) for p in batch)):
                live = [p for p in batch if turn < len(p.question.turns) and p.failed is None]
                prompts = [render_prompt(conversation(p.question, p.answers, turn), template) for p in live]
                for p, text in zip(live, generate_batch(model, tokenizer, device, prompts, temp, ev.max_new_tokens),
                                   strict=True):
                    if text is None:
                        p.failed = f"turn {turn + 1}: the prompt fills the model's context"
                    else:
                        p.answers.append(text)
            for p in batch:
                on_done(p)
            finished += batch
            log.info("generate: %d/%d questions (temperature %.2f), %.0fs", len(finished), total, temp,
                     time.monotonic() - started)
    return finished


def answer_record(p: Pending, mid: str) -> dict[str, Any]:
    return {"question_id": p.question.question_id, "answer_id": uuid.uuid4().hex, "model_id": mid,
            "choices": [{"index": 0, "turns": p.answers}], "tstamp": time.time()}


def _check(cfg: DictConfig) -> None:
    ev = cfg.eval
    if ev.batch_size < 1:
        raise UsageError(f"eval.batch_size={ev.batch_size}: must be >= 1")
    if ev.max_new_tokens < 1:
        raise UsageError(f"eval.max_new_tokens={ev.max_new_tokens}: must be >= 1")
    for cat, t in list(ev.temperature.items()) + [("default_temperature", ev.default_temperature)]:
        if t < 0:
            raise UsageError(f"eval.temperature.{cat}={t}: must be >= 0 (0 = greedy)")


def main(cfg: DictConfig) -> int:
    """Check inputs, load the model, answer what is not answered yet, write FastChat answers."""
    ev = cfg.eval
    if ev.require_judge:  # before hours of generation, not after
        try:
            resolve_endpoint(ev.judge)
        except UsageError as e:
            raise UsageError(f"{e} (or eval.require_judge=false to generate answers without a judge)") from None
    _check(cfg)
    paths = resolve_paths(cfg)
    questions = load_questions(paths.questions, ev.limit)
    with_adapter = adapter_source(cfg)
    src, adapter = with_adapter if with_adapter else (model_source(cfg), None)
    # an adapter's answers are not its base's: filed under the run's name (RUN_DIR/final_adapter)
    mid = model_id(cfg) if adapter is None or cfg.eval.model_id else f"{adapter.parent.name}-{adapter.name}"
    template, template_source = training_template(cfg)
    from vicuna_exp.data.template import check_template, with_special_tokens

    check_template(template)
    tokenizer_dir = adapter if adapter is not None else _tokenizer_dir(cfg, src)

    out_file = paths.answers_file(mid)
    if ev.overwrite and out_file.exists():
        out_file.unlink()
    done = load_answers(out_file, lenient=True) if out_file.is_file() else {}
    todo = [q for q in questions if q.question_id not in done or len(done[q.question_id].turns) < len(q.turns)]
    print(f"generate: {len(questions)} questions from {paths.questions}; {len(questions) - len(todo)} already "
          f"answered in {out_file}; model {src}{' + adapter ' + str(adapter) if adapter else ''}; template from {template_source}")

    failed: list[Pending] = []
    if todo:
        import torch

        torch.manual_seed(ev.seed)
        model, tokenizer, device = load_model(src, tokenizer_dir, ev.device, ev.dtype, adapter)
        template = with_special_tokens(template, tokenizer)
        write_json_atomic(paths.generation_record, {
            "model_id": mid, "model_path": str(src), "adapter": str(adapter) if adapter else None, "questions": str(paths.questions), "bench": paths.bench,
            "template": OmegaConf.to_container(template, resolve=True), "max_new_tokens": ev.max_new_tokens,
            "temperature": dict(ev.temperature), "default_temperature": ev.default_temperature,
            "seed": ev.seed, "device": str(device), "dtype": str(next(model.parameters()).dtype),
            "tstamp": time.time(),
        })

        def on_done(p: Pending) -> None:
            if p.failed:
                failed.append(p)
            if p.answers:
                append_jsonl(out_file, [answer_record(p, mid)])

        try:
            answer_questions(model, tokenizer, device, template, todo, cfg, on_done)
        finally:
            _reorganize(out_file)
    print(f"answers: {out_file}")
    if failed:
        print(f"{len(failed)} question(s) not fully answered:")
        for p in failed:
            print(f"  question {p.question.question_id}: {p.failed}")
        return EXIT_FAILED
    return EXIT_OK


def _tokenizer_dir(cfg: DictConfig, src: Path) -> Path:
    """A run's final/ holds its tokenizer; a bare model dir may borrow `model.tokenizer`."""
    if cfg.eval.run_dir or (src / "tokenizer_config.json").is_file():
        return src
    tok = select(cfg, "model.tokenizer")
    return absolute_path(str(tok)) if tok else src


def _reorganize(path: Path) -> None:
    """One line per question (the latest), sorted by question id: FastChat's tidy layout."""
    if not path.is_file():
        return
    latest = load_answers(path, lenient=True)
    write_jsonl_atomic(path, [latest[q].record for q in sorted(latest, key=sort_key)])
