"""Schema of the `eval` config node, and the file layout every eval step derives from it.

Light on purpose (no torch): the root schema imports this module. All three eval steps
(generate, judge, report) read the same node, so the paths they share are computed in
one place, `resolve_paths`, and never spelled twice.

Layout (FastChat's, one folder per question set, so MT-bench tooling reads it as is):

    RUN_DIR/eval/judge_cache.jsonl              judge replies, keyed by model + prompt + content
    RUN_DIR/eval/<bench>/model_answer/<model_id>.jsonl
    RUN_DIR/eval/<bench>/model_judgment/<judge>_single.jsonl | <judge>_pair.jsonl
    RUN_DIR/eval/<bench>/generation.json        what produced the answers (model, template, sampling)
    RUN_DIR/eval/<bench>/report.md | scores.json | report.png
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from vicuna_exp.choices import EvalDtype
from vicuna_exp.errors import UsageError

PACKAGED_QUESTIONS_DIR = Path(__file__).resolve().parents[1] / "assets" / "questions"
DEFAULT_QUESTIONS = PACKAGED_QUESTIONS_DIR / "vx_mt_bench.jsonl"


class JudgeMode(Enum):
    """Single-answer grading (1-10 per answer) or pairwise comparison (A, B or tie)."""

    single = "single"
    pairwise = "pairwise"


def _mt_bench_temperatures() -> dict[str, float]:
    # MT-bench's per-category sampling temperatures: creative categories sample,
    # categories with one right answer are greedy.
    return {
        "writing": 0.7,
        "roleplay": 0.7,
        "extraction": 0.0,
        "math": 0.0,
        "coding": 0.0,
        "reasoning": 0.0,
        "stem": 0.1,
        "humanities": 0.1,
    }


@dataclass
class JudgeConfig:
    """The LLM judge behind an OpenAI-compatible chat-completions endpoint."""

    base_url: str | None = None  # e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1
    model: str | None = None  # judge model name sent to the endpoint, e.g. gpt-4
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this env var only, never from config
    mode: JudgeMode = JudgeMode.single
    prompt: str | None = None  # prompt config name in conf/eval/judge/ or a .yaml path; None: the mode's name
    prompt_dir: str | None = None  # where named prompt configs live; None: <config dir>/eval/judge
    models: list[str] = field(default_factory=list)  # answer files to judge; empty: every file in model_answer/
    baseline_model: str | None = None  # pairwise: each model against this one; None: all pairs
    reference_answers: str | None = None  # FastChat answer JSONL whose turns are reference answers
    reference_categories: list[str] = field(default_factory=lambda: ["math", "reasoning", "coding"])
    temperature: float = 0.0
    max_tokens: int = 2048
    concurrency: int = 4  # requests in flight at once
    max_retries: int = 5  # retries after the first attempt, on 429, 5xx, timeouts and dropped connections
    timeout_s: float = 120.0  # per request
    backoff_s: float = 2.0  # first retry delay; doubles each retry
    max_backoff_s: float = 60.0
    cache_path: str | None = None  # None: RUN_DIR/eval/judge_cache.jsonl


@dataclass
class EvalConfig:
    """Where the model comes from, which questions, how to sample, who judges."""

    run_dir: str | None = None  # a training run dir: model from RUN_DIR/final, outputs to RUN_DIR/eval
    out_dir: str | None = None  # None: RUN_DIR/eval, or <hydra run dir>/eval when only model.path is set
    questions: str | None = None  # FastChat question JSONL; None: the packaged vx_mt_bench set
    bench_name: str | None = None  # None: the question file's stem (its folder's name for question.jsonl)
    limit: int | None = None  # only the first N questions (smoke tests)
    model_id: str | None = None  # None: the run dir's (or model path's) folder name
    # A peft adapter dir (a finetune=lora run's final_adapter/), answered with on its base: model.path,
    # or the base the adapter names when model.path is unset.
    adapter: str | None = None
    batch_size: int = 8
    max_new_tokens: int = 1024
    temperature: dict[str, float] = field(default_factory=_mt_bench_temperatures)  # per category
    default_temperature: float = 0.7  # categories not listed above
    seed: int = 0
    device: str = "auto"  # auto: cuda if available, else cpu
    dtype: EvalDtype = EvalDtype.auto  # auto: bfloat16 on cuda, float32 on cpu; or float32|bfloat16|float16
    overwrite: bool = False  # False: keep answers already written and answer only the missing questions
    require_judge: bool = True  # generate checks the judge endpoint first, so a missing key fails fast
    reference_model: str | None = None  # report: relative total score denominator; None: judge.baseline_model
    judge: JudgeConfig = field(default_factory=JudgeConfig)


@dataclass(frozen=True)
class EvalPaths:
    """Every file the eval steps read or write, derived from the config."""

    out_dir: Path
    bench: str
    questions: Path

    @property
    def bench_dir(self) -> Path:
        return self.out_dir / self.bench

    @property
    def answers_dir(self) -> Path:
        return self.bench_dir / "model_answer"

    @property
    def judgments_dir(self) -> Path:
        return self.bench_dir / "model_judgment"

    @property
    def generation_record(self) -> Path:
        return self.bench_dir / "generation.json"

    def answers_file(self, model_id: str) -> Path:
        return self.answers_dir / f"{safe_name(model_id)}.jsonl"

    def judgments_file(self, judge_model: str, mode: JudgeMode) -> Path:
        suffix = "single" if mode is JudgeMode.single else "pair"
        return self.judgments_dir / f"{safe_name(judge_model)}_{suffix}.jsonl"

    def report_file(self, suffix: str) -> Path:
        names = {"md": "report.md", "json": "scores.json", "png": "report.png"}
        return self.bench_dir / names[suffix]


def safe_name(name: str) -> str:
    """A model or judge name as a file name (`org/model` -> `org--model`)."""
    return re.sub(r"[^A-Za-z0-9._+-]", "-", name.replace("/", "--"))


def absolute_path(path: str) -> Path:
    """Resolve against the directory the user launched from, even inside a Hydra job."""
    try:
        from hydra.utils import to_absolute_path

        return Path(to_absolute_path(path))
    except Exception:  # no Hydra runtime: plain cwd-relative
        return Path(path).expanduser().resolve()


def _hydra_output_dir() -> Path | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return Path(HydraConfig.get().runtime.output_dir)
    except Exception:
        return None
    return None


def select(cfg: Any, key: str) -> Any:
    """A key outside the eval node (e.g. `model.path`), None when absent or mandatory-unset."""
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)


def run_dir(cfg: Any) -> Path | None:
    return absolute_path(cfg.eval.run_dir) if cfg.eval.run_dir else None


def bench_name(questions: Path) -> str:
    """FastChat keeps `data/<bench>/question.jsonl`; elsewhere the file stem names the set."""
    return questions.parent.name if questions.stem == "question" else questions.stem


def questions_path(cfg: Any) -> Path:
    return absolute_path(cfg.eval.questions) if cfg.eval.questions else DEFAULT_QUESTIONS


def resolve_paths(cfg: Any) -> EvalPaths:
    """The eval layout for this config; UsageError when there is nowhere to write."""
    ev = cfg.eval
    questions = questions_path(cfg)
    if ev.out_dir:
        out_dir = absolute_path(ev.out_dir)
    elif ev.run_dir:
        rd = run_dir(cfg)
        if not rd.is_dir():
            raise UsageError(f"eval.run_dir={ev.run_dir}: no such directory")
        out_dir = rd / "eval"
    else:
        hydra_dir = _hydra_output_dir()
        if hydra_dir is None:
            raise UsageError("eval: set eval.run_dir (a training run dir) or eval.out_dir (where eval files go)")
        out_dir = hydra_dir / "eval"
    return EvalPaths(out_dir=out_dir, bench=ev.bench_name or bench_name(questions), questions=questions)


def model_source(cfg: Any) -> Path:
    """The HF model dir to answer with: RUN_DIR/final when eval.run_dir is set, else model.path."""
    if cfg.eval.run_dir:
        final = run_dir(cfg) / "final"
        if not (final / "config.json").is_file():
            raise UsageError(
                f"eval.run_dir={cfg.eval.run_dir}: no final model ({final}/config.json missing); "
                "has the run completed? Or set model.path to a Hugging Face model dir"
            )
        return final
    path = select(cfg, "model.path")
    if not path:
        raise UsageError("eval generate: set eval.run_dir (a training run) or model.path (a Hugging Face model dir)")
    src = absolute_path(str(path))
    if not (src / "config.json").is_file():
        raise UsageError(f"model.path={path}: not a Hugging Face model dir (no config.json)")
    return src


def model_id(cfg: Any) -> str:
    """The name answers are filed under; FastChat's `model_id`."""
    if cfg.eval.model_id:
        return cfg.eval.model_id
    if cfg.eval.run_dir:
        return run_dir(cfg).name
    path = select(cfg, "model.path")
    if path:
        return absolute_path(str(path)).name
    raise UsageError("eval: set eval.model_id, eval.run_dir or model.path")


def temperature_for(cfg: Any, category: str) -> float:
    temps = cfg.eval.temperature
    return float(temps[category]) if category in temps else float(cfg.eval.default_temperature)
