"""Judge prompt configs (`conf/eval/judge/*.yaml`) and the chat messages built from them.

A prompt config holds one mode's four prompts: `default`, `reference` (with a reference
answer, for categories with one right answer), `multi_turn` and `multi_turn_reference`
(the whole two-turn conversation, grading the second answer). Each has a `name` (recorded
in every judgment, as FastChat does), a `system` prompt and a `template` with {placeholders}.
Placeholders are checked when the config is loaded, so a typo fails before any request.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vicuna_exp.errors import UsageError
from vicuna_exp.eval.config import JudgeMode, absolute_path

SLOTS = ("default", "reference", "multi_turn", "multi_turn_reference")

# What each slot may use, per mode; the second set must appear (the answers being judged).
_FIELDS: dict[tuple[JudgeMode, str], tuple[frozenset[str], frozenset[str]]] = {}


def _fields(mode: JudgeMode, slot: str, allowed: set[str], required: set[str]) -> None:
    _FIELDS[(mode, slot)] = (frozenset(allowed | required), frozenset(required))


_fields(JudgeMode.single, "default", {"question"}, {"answer"})
_fields(JudgeMode.single, "reference", {"question", "ref_answer_1"}, {"answer"})
_fields(JudgeMode.single, "multi_turn", {"question_1", "question_2", "answer_1"}, {"answer_2"})
_fields(JudgeMode.single, "multi_turn_reference",
        {"question_1", "question_2", "answer_1", "ref_answer_1", "ref_answer_2"}, {"answer_2"})
_fields(JudgeMode.pairwise, "default", {"question"}, {"answer_a", "answer_b"})
_fields(JudgeMode.pairwise, "reference", {"question", "ref_answer_1"}, {"answer_a", "answer_b"})
_fields(JudgeMode.pairwise, "multi_turn", {"question_1", "question_2", "answer_a_1", "answer_b_1"},
        {"answer_a_2", "answer_b_2"})
_fields(JudgeMode.pairwise, "multi_turn_reference",
        {"question_1", "question_2", "answer_a_1", "answer_b_1", "ref_answer_1", "ref_answer_2"},
        {"answer_a_2", "answer_b_2"})


@dataclass(frozen=True)
class JudgePrompt:
    name: str
    system: str
    template: str

    def messages(self, **fields: str) -> list[dict[str, str]]:
        """Chat messages for one judgment; no system message when the system prompt is empty."""
        msgs = [{"role": "system", "content": self.system.format(**fields)}] if self.system else []
        msgs.append({"role": "user", "content": self.template.format(**fields)})
        return msgs


@dataclass(frozen=True)
class PromptSet:
    config: str  # the config's name (file stem), for messages
    mode: JudgeMode
    prompts: dict[str, JudgePrompt]  # slot -> prompt; reference slots may be absent

    def pick(self, turn: int, with_reference: bool) -> JudgePrompt:
        """The prompt for grading `turn` (1 or 2); falls back to the no-reference prompt."""
        base = "default" if turn == 1 else "multi_turn"
        ref = "reference" if turn == 1 else "multi_turn_reference"
        return self.prompts[ref] if with_reference and ref in self.prompts else self.prompts[base]

    def has_reference_prompts(self) -> bool:
        return "reference" in self.prompts

    def check_turns(self, max_turns: int, path: Path) -> None:
        """Two-turn questions need the multi-turn prompt; more turns than two are not graded."""
        if max_turns > 2:
            raise UsageError(f"judging grades at most two turns (MT-bench); the question set has {max_turns}")
        if max_turns == 2 and "multi_turn" not in self.prompts:
            raise UsageError(f"{path}: the question set has two-turn questions but no prompts.multi_turn")


def _placeholders(text: str, where: str) -> set[str]:
    try:
        return {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
    except ValueError as e:
        raise UsageError(f"{where}: bad placeholder syntax ({e}); write a literal brace as {{{{ or }}}}") from None


def prompt_path(judge: Any) -> Path:
    """A prompt config by name (in prompt_dir, default conf/eval/judge) or by .yaml path."""
    name = judge.prompt or judge.mode.value
    if name.endswith((".yaml", ".yml")) or "/" in name:
        return absolute_path(name)
    if judge.prompt_dir:
        folder = absolute_path(judge.prompt_dir)
    else:
        from vicuna_exp.config import conf_dir

        folder = conf_dir() / "eval" / "judge"
    path = folder / f"{name}.yaml"
    if not path.is_file():
        choices = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
        raise UsageError(f"eval.judge.prompt={name}: no {path}; choose one of: {', '.join(choices) or '(none)'}")
    return path


def load_prompt_set(path: Path, mode: JudgeMode | None = None) -> PromptSet:
    """Load and check a prompt config; `mode` (when given) must match the config's."""
    from omegaconf import OmegaConf

    if not path.is_file():
        raise UsageError(f"{path}: judge prompt config not found")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as e:
        raise UsageError(f"{path}: not a readable YAML prompt config ({e})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("prompts"), dict):
        raise UsageError(f"{path}: expected keys 'mode' and 'prompts' ({', '.join(SLOTS)})")
    try:
        file_mode = JudgeMode(raw.get("mode"))
    except ValueError:
        raise UsageError(f"{path}: 'mode' must be single or pairwise, got {raw.get('mode')!r}") from None
    if mode is not None and file_mode is not mode:
        raise UsageError(f"{path}: a {file_mode.value} prompt config, but eval.judge.mode={mode.value}")
    unknown = set(raw["prompts"]) - set(SLOTS)
    if unknown:
        raise UsageError(f"{path}: unknown prompt slot(s) {sorted(unknown)}; slots are {', '.join(SLOTS)}")
    prompts: dict[str, JudgePrompt] = {}
    for slot, spec in raw["prompts"].items():
        where = f"{path}: prompts.{slot}"
        if not isinstance(spec, dict) or not isinstance(spec.get("template"), str) or not spec.get("name"):
            raise UsageError(f"{where}: needs 'name' and 'template' (and optionally 'system')")
        system = spec.get("system") or ""
        allowed, required = _FIELDS[(file_mode, slot)]
        used = _placeholders(spec["template"], where) | _placeholders(system, where)
        if used - allowed:
            raise UsageError(f"{where}: unknown placeholder(s) {sorted(used - allowed)}; allowed: {sorted(allowed)}")
        if required - used:
            raise UsageError(f"{where}: must show {sorted(required - used)} to the judge")
        prompts[slot] = JudgePrompt(str(spec["name"]), str(system), spec["template"])
    if "default" not in prompts:
        raise UsageError(f"{path}: missing prompts.default")
    return PromptSet(config=path.stem, mode=file_mode, prompts=prompts)
