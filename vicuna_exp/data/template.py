"""Conversation templates: render a conversation to text, knowing which characters are supervised.

A template (`TemplateConfig`, a YAML in `conf/template/`) is a handful of format strings. Rendering
produces `Segment`s: literal text, structural special tokens (`{bos}`/`{eos}`: real special tokens,
never the same characters typed inside a message) and, for each assistant turn, the supervised part:
everything after the generation prompt (for Vicuna v1.1: ` {reply}</s>`). Training, inference
prompts (`render_prompt`) and the Hugging Face chat template (`chat_template.to_jinja`) all come
from these segments, so they cannot drift apart.
"""

from __future__ import annotations

import functools
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vicuna_exp.errors import UsageError

if TYPE_CHECKING:
    from vicuna_exp.data.config import TemplateConfig

USER, ASSISTANT, SYSTEM = "user", "assistant", "system"
_FIELDS = {"system", "role", "content", "bos", "eos"}
# Role names accepted by `to_turns` (ShareGPT `from` values and chat `role` values).
DEFAULT_ROLE_MAP = {
    "human": USER, "user": USER,
    "gpt": ASSISTANT, "chatgpt": ASSISTANT, "bard": ASSISTANT, "bing": ASSISTANT, "assistant": ASSISTANT,
    "model": ASSISTANT,
    "system": SYSTEM,
}


@dataclass(frozen=True)
class Segment:
    """A piece of a rendered conversation. `special` text is a structural special token's string."""

    text: str
    special: bool = False
    supervised: bool = False
    pair: int = -1  # which (user, assistant) pair it belongs to; -1: before the first (BOS, system)


Turn = tuple[str, str]  # (user|assistant, content)


@functools.lru_cache(maxsize=256)
def _parse(fmt: str, key: str) -> tuple[tuple[str, str | None], ...]:
    """A format string as (literal, field) pairs; unknown fields are a usage error naming the key."""
    try:
        parts = tuple((lit, name) for lit, name, _spec, _conv in string.Formatter().parse(fmt))
    except ValueError as exc:
        raise UsageError(f"{key}: bad format string {fmt!r}: {exc}") from exc
    for _lit, name in parts:
        if name is not None and name not in _FIELDS:
            raise UsageError(f"{key}: unknown placeholder {{{name}}} in {fmt!r}; allowed: {sorted(_FIELDS)}")
    return parts


class _Builder:
    """Accumulates segments, merging neighbouring text of the same kind, and drops a leading {bos}."""

    def __init__(self, template: TemplateConfig, started: bool = False):
        self.t = template
        self._done: list[Segment] = []
        self._run: list[str] = []  # text not yet turned into a segment
        self._run_kind: tuple[bool, int] = (False, -1)  # (supervised, pair) of the run
        self._started = started  # anything emitted yet (a {bos} at the very start is the tokenizer's)
        self.pair = -1

    def text(self, text: str, supervised: bool = False) -> None:
        if not text:
            return
        kind = (supervised, self.pair)
        if self._run and kind != self._run_kind:
            self._flush()
        self._run.append(text)
        self._run_kind = kind
        self._started = True

    def _flush(self) -> None:
        if self._run:
            self._done.append(Segment("".join(self._run), False, *self._run_kind))
            self._run = []

    def special_token(self, token: str, supervised: bool = False) -> None:
        self._flush()
        self._done.append(Segment(token, True, supervised, self.pair))
        self._started = True

    def special(self, which: str, supervised: bool = False) -> None:
        if which == "bos" and not self._started:
            return  # the tokenizer adds BOS at the start, as it does at inference
        self.special_token(self.t.bos_token if which == "bos" else self.t.eos_token, supervised)

    @property
    def segments(self) -> list[Segment]:
        self._flush()
        return self._done

    def emit(self, fmt: str, key: str, values: Mapping[str, Any], supervised: bool = False) -> None:
        for lit, name in _parse(fmt, key):
            if lit:
                self.text(lit, supervised)
            if name is None:
                continue
            if name in ("bos", "eos"):
                self.special(name, supervised)
            else:
                value = values.get(name, "")
                if isinstance(value, list):  # a pre-rendered system part (segments)
                    for seg in value:
                        if seg.special:
                            self.special_token(seg.text, supervised)
                        else:
                            self.text(seg.text, supervised)
                else:
                    self.text(value if isinstance(value, str) else str(value), supervised)


def _system_segments(template: TemplateConfig, system: str) -> list[Segment]:
    """The system part's segments; the same few system prompts recur in every conversation and
    every split piece, so they are rendered once (the key is everything the rendering reads)."""
    return list(_system_segments_cached(template.system_format, template.bos_token, template.eos_token, system))


@functools.lru_cache(maxsize=64)
def _system_segments_cached(system_format: str, bos_token: str, eos_token: str, system: str) -> tuple[Segment, ...]:
    from types import SimpleNamespace

    b = _Builder(SimpleNamespace(bos_token=bos_token, eos_token=eos_token),  # type: ignore[arg-type]
                 started=True)  # not the start of the text: keep a {bos} in system_format
    b.emit(system_format, "template.system_format", {"system": system})
    return tuple(b.segments)


def generation_prompt(template: TemplateConfig) -> str:
    """The text that opens an assistant turn and that a prompt for generation ends with."""
    if template.generation_prompt is not None:
        return template.generation_prompt.replace("{role}", template.roles[ASSISTANT])
    prefix = template.assistant_format.split("{content}", 1)[0]
    return prefix.replace("{role}", template.roles[ASSISTANT]).rstrip(" ")


def check_template(template: TemplateConfig) -> None:
    """Fail early, naming the key, on a template that cannot render a conversation."""
    for key in ("system_format", "user_format", "assistant_format"):
        _parse(getattr(template, key), f"template.{key}")
    for role in (USER, ASSISTANT):
        if role not in template.roles:
            raise UsageError(f"template.roles: needs a '{role}' entry, got {dict(template.roles)}")
    if template.assistant_format.count("{content}") != 1:
        raise UsageError(f"template.assistant_format: needs exactly one {{content}}, got {template.assistant_format!r}")
    if template.user_format.count("{content}") != 1:
        raise UsageError(f"template.user_format: needs exactly one {{content}}, got {template.user_format!r}")
    prefix = template.assistant_format.split("{content}", 1)[0].replace("{role}", template.roles[ASSISTANT])
    gen = generation_prompt(template)
    if not prefix.startswith(gen):
        raise UsageError(
            f"template.generation_prompt: {gen!r} must be how assistant_format begins ({prefix!r}), "
            "so a prompt for generation is exactly a prefix of the training text"
        )


def render_segments(
    template: TemplateConfig,
    system: str | None,
    turns: Sequence[Turn],
    *,
    add_generation_prompt: bool = False,
) -> list[Segment]:
    """Render alternating (user, assistant) turns; `system=None` means the template's default prompt."""
    system_text = template.system if system is None else system
    system_in_user = "{system}" in template.user_format
    sys_segs = _system_segments(template, system_text) if system_text else []
    b = _Builder(template)
    if sys_segs and not system_in_user:
        for seg in sys_segs:
            if seg.special:
                b.special_token(seg.text)
            else:
                b.text(seg.text)
    gen = generation_prompt(template)
    prefix_fmt, has_content, suffix_fmt = template.assistant_format.partition("{content}")
    # the generation prompt is unsupervised; what follows it is what the model must produce
    rest = prefix_fmt.replace("{role}", template.roles[ASSISTANT])[len(gen):]
    first_user = True
    for role, content in turns:
        if role == USER:
            b.pair += 1
            values = {"role": template.roles[USER], "content": content,
                      "system": sys_segs if (first_user and system_in_user) else ""}
            b.emit(template.user_format, "template.user_format", values)
            first_user = False
        elif role == ASSISTANT:
            if not has_content:
                raise ValueError(f"template.assistant_format: needs {{content}}, got {template.assistant_format!r}")
            b.emit(gen, "template.generation_prompt", {})
            b.emit(rest, "template.assistant_format", {}, supervised=True)
            b.text(content, supervised=True)
            b.emit(suffix_fmt, "template.assistant_format", {"role": template.roles[ASSISTANT]}, supervised=True)
        else:
            raise ValueError(f"turn role must be user or assistant, got {role!r}")
    if add_generation_prompt:
        b.emit(gen, "template.generation_prompt", {})
    return b.segments


def segments_text(segments: Iterable[Segment]) -> str:
    return "".join(s.text for s in segments)


def to_turns(messages: Sequence[Mapping[str, Any]]) -> tuple[str | None, list[Turn]]:
    """ShareGPT turns (`from`/`value`) or chat messages (`role`/`content`) as (system, turns).

    A leading system message becomes the system prompt. No cleaning happens here: the turns must
    already alternate user/assistant, starting with the user.
    """
    system: str | None = None
    turns: list[Turn] = []
    for i, m in enumerate(messages):
        raw_role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        role = DEFAULT_ROLE_MAP.get(str(raw_role).lower())
        if role is None or not isinstance(content, str):
            raise ValueError(f"message {i}: needs a known role and string content, got {dict(m)!r}")
        if role == SYSTEM:
            if i != 0:
                raise ValueError(f"message {i}: a system message must come first")
            system = content
            continue
        expected = USER if len(turns) % 2 == 0 else ASSISTANT
        if role != expected:
            raise ValueError(f"message {i}: expected a {expected} turn, got {role} (turns must alternate from user)")
        turns.append((role, content))
    return system, turns


def render(messages: Sequence[Mapping[str, Any]], template: TemplateConfig) -> str:
    """The training text of a whole conversation (no BOS text: the tokenizer adds BOS)."""
    system, turns = to_turns(messages)
    return segments_text(render_segments(template, system, turns))


def render_prompt(messages: Sequence[Mapping[str, Any]], template: TemplateConfig) -> str:
    """A conversation ending with a user turn, followed by the assistant's generation prompt.

    Exactly a prefix of the training text of the same conversation with the reply filled in
    (for Vicuna v1.1: `... USER: {q} ASSISTANT:`). No BOS text: the tokenizer adds BOS.
    """
    system, turns = to_turns(messages)
    if not turns or turns[-1][0] != USER:
        raise ValueError("render_prompt needs a conversation that ends with a user turn")
    return segments_text(render_segments(template, system, turns, add_generation_prompt=True))
