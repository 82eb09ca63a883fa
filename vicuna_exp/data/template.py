"""Conversation templates: render a conversation to text, knowing which characters are supervised.

A template (`TemplateConfig`, a YAML in `conf/template/`) is a handful of format strings. Each
assistant turn's supervised part is everything after the generation prompt (for Vicuna v1.1:
` {reply}</s>`). `{bos}`/`{eos}`, and the tokens of `special_tokens` the format strings write
literally, are structural special tokens: the encoder writes them as characters no message can
hold, so the same characters typed inside a message stay text. `{cut}` writes nothing: it marks a
point the tokenizer must not join across, for formats whose reference encoder tokenizes the text on
either side apart (Meta's Llama-3 `ChatFormat`: a header's `\n\n`, then the message).
Training, inference prompts (`render_prompt`) and the Hugging Face chat template
(`chat_template.to_jinja`) all come from the same format strings, so they cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import functools
import string
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from vicuna_exp.errors import UsageError

if TYPE_CHECKING:
    from vicuna_exp.data.config import TemplateConfig

USER, ASSISTANT, SYSTEM = "user", "assistant", "system"
_FIELDS = {"system", "role", "content", "bos", "eos", "cut"}
# Role names accepted by `to_turns` (ShareGPT `from` values and chat `role` values).
DEFAULT_ROLE_MAP = {"human": USER, "user": USER, "system": SYSTEM, **dict.fromkeys(
    ("gpt", "chatgpt", "bard", "bing", "assistant", "model"), ASSISTANT)}
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
    tokens = list(getattr(template, "special_tokens", None) or [])
    if not all(isinstance(t, str) and t for t in tokens) or len(set(tokens)) != len(tokens):
        raise UsageError(f"template.special_tokens: distinct non-empty token strings, got {tokens!r}")
    for role in (USER, ASSISTANT):
        if role not in template.roles:
            raise UsageError(f"template.roles: needs a '{role}' entry, got {dict(template.roles)}")
    for key in ("user_format", "assistant_format"):
        if getattr(template, key).count("{content}") != 1:
            raise UsageError(f"template.{key}: needs exactly one {{content}}, got {getattr(template, key)!r}")
    prefix = template.assistant_format.split("{content}", 1)[0].replace("{role}", template.roles[ASSISTANT])
    gen = generation_prompt(template)
    if not prefix.startswith(gen):
        raise UsageError(f"template.generation_prompt: {gen!r} must be how assistant_format begins "
                         f"({prefix!r}), so a prompt for generation is exactly a prefix of the training text")


def with_special_tokens(template: Any, tokenizer: Any) -> Any:
    """The template with a null `bos_token` / `eos_token` filled in from the tokenizer's own, so a
    template serves every vocabulary (`<s>`/`</s>` of LLaMA and Mistral, `<|begin_of_text|>` and
    the tokenizer's EOS of Llama-3). A tokenizer without BOS (Qwen) leaves it null; a template
    that writes `{bos}` then cannot render. Returns the same kind of object it was given."""
    bos = template.bos_token if template.bos_token is not None else tokenizer.bos_token
    eos = template.eos_token if template.eos_token is not None else tokenizer.eos_token
    name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    if eos is None:
        raise UsageError(f"template.eos_token: null takes the tokenizer's EOS, and {name} has none; set one")
    if bos is None and any("{bos}" in getattr(template, k) for k in ("system_format", "user_format",
                                                                        "assistant_format")):
        raise UsageError(f"template.bos_token: the template writes {{bos}}, and {name} has no BOS token; set one")
    if (bos, eos) == (template.bos_token, template.eos_token):
        return template
    if dataclasses.is_dataclass(template):
        return dataclasses.replace(template, bos_token=bos, eos_token=eos)
    from omegaconf import OmegaConf

    return OmegaConf.merge(template, {"bos_token": bos, "eos_token": eos})


def render_spans(template: TemplateConfig, system: str | None, turns: Sequence[Turn], *,
                 special: Mapping[str, str] | None = None, add_generation_prompt: bool = False,
                 ) -> tuple[str, list[list[int]], list[int]]:
    """(text, supervised [start, end) character spans, where each (user, assistant) pair starts).

    `system=None` means the template's default prompt. `special` gives the characters written for
    `{bos}` and `{eos}` (keys "bos", "eos"), for `{cut}` (key "cut"; default: nothing) and for the
    literal `special_tokens` in the template's text (keyed by the token; default: the token strings
    themselves). A `{bos}` of the user or
    assistant format at the very start is left out: the tokenizer adds BOS there, as it does at inference."""
    if special is None:
        special = {"bos": template.bos_token, "eos": template.eos_token}
        for name, token in special.items():
            if token is None and any(f"{{{name}}}" in f for f in (template.system_format, template.user_format,
                                                                 template.assistant_format)):
                raise UsageError(f"template.{name}_token: null means the tokenizer's; fill it in from the "
                                 "tokenizer (template.with_special_tokens) before rendering text")
    literal = _literal_tokens(template, special)
    system_text = template.system if system is None else system
    system_in_user = "{system}" in template.user_format
    parts: list[str] = []
    spans: list[list[int]] = []
    pairs: list[int] = []
    pos = 0  # characters so far

    def put(text: str, supervised: bool) -> None:
        nonlocal pos
        if not text:
            return
        if supervised and spans and spans[-1][1] == pos:
            spans[-1][1] = pos + len(text)  # touching supervised text is one span
        elif supervised:
            spans.append([pos, pos + len(text)])
        parts.append(text)
        pos += len(text)

    def emit(fmt: str, key: str, values: Mapping[str, str], supervised: bool = False) -> None:
        for lit, name in _parse(fmt, key):
            put(literal(lit), supervised)
            if name == "system" and values.get("system"):
                emit_system(values["system"])
            elif name == "eos" or name == "bos" and pos:
                put(special[name], supervised)
            elif name == "cut":
                put(special.get("cut", ""), supervised)
            elif name in ("role", "content"):
                put(values.get(name, ""), supervised)

    def emit_system(text: str) -> None:  # its {bos} is never the tokenizer's, even at the very start
        for lit, name in _parse(template.system_format, "template.system_format"):
            put(literal(lit), False)
            put(text if name == "system" else special.get(name or "", ""), False)

    if system_text and not system_in_user:
        emit_system(system_text)
    gen = generation_prompt(template)
    prefix_fmt, _, suffix_fmt = template.assistant_format.partition("{content}")
    rest = prefix_fmt.replace("{role}", template.roles[ASSISTANT])[len(gen):]  # supervised, after the prompt
    for role, content in turns:
        if role == USER:
            pairs.append(pos)
            first = len(pairs) == 1
            emit(template.user_format, "template.user_format", {
                "role": template.roles[USER], "content": content,
                "system": system_text if first and system_in_user else ""})
        elif role == ASSISTANT:
            emit(gen, "template.generation_prompt", {})
            emit(rest, "template.assistant_format", {}, supervised=True)
            put(content, True)
            emit(suffix_fmt, "template.assistant_format", {"role": template.roles[ASSISTANT]}, supervised=True)
        else:
            raise ValueError(f"turn role must be user or assistant, got {role!r}")
    if add_generation_prompt:
        emit(gen, "template.generation_prompt", {})
    return "".join(parts), spans, pairs


def _literal_tokens(template: TemplateConfig, special: Mapping[str, str]) -> Any:
    """Template text with its literal special tokens written as `special` gives them."""
    swaps = [(t, special[t]) for t in (getattr(template, "special_tokens", None) or []) if special.get(t, t) != t]
    if not swaps:
        return lambda text: text

    def literal(text: str) -> str:
        for token, char in swaps:
            text = text.replace(token, char)
        return text

    return literal


def to_turns(messages: Sequence[Mapping[str, Any]]) -> tuple[str | None, list[Turn]]:
    """ShareGPT turns (`from`/`value`) or chat messages (`role`/`content`) as (system, turns): a leading
    system message is the system prompt. No cleaning: the turns must alternate from the user."""
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
    return render_spans(template, system, turns)[0]


def render_prompt(messages: Sequence[Mapping[str, Any]], template: TemplateConfig) -> str:
    """A conversation ending with a user turn, then the generation prompt: exactly a prefix of the
    training text with the reply filled in (Vicuna v1.1: `... USER: {q} ASSISTANT:`), no BOS text."""
    system, turns = to_turns(messages)
    if not turns or turns[-1][0] != USER:
        raise ValueError("render_prompt needs a conversation that ends with a user turn")
    return render_spans(template, system, turns, add_generation_prompt=True)[0]
