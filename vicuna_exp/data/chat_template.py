"""The Hugging Face `chat_template` of a training template: the same format strings as training, as Jinja.

Apart from `template` because the template is checked against the encoder (the BOS joiner), and
the encoder is built on the template.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING

from vicuna_exp.data.encode import encode_conversation
from vicuna_exp.data.template import (
    ASSISTANT,
    USER,
    _parse,
    check_template,
    generation_prompt,
    render_spans,
    with_special_tokens,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from vicuna_exp.data.config import TemplateConfig


def _jinja_str(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Jinja string literal


def _jinja_format(fmt: str, exprs: Mapping[str, str], template: TemplateConfig) -> str:
    out = []
    for lit, name in _parse(fmt, "template"):
        if lit:
            out.append("{{ " + _jinja_str(lit) + " }}")
        if name is None or name == "cut":  # a tokenization cut writes no text
            continue
        if name in ("bos", "eos"):
            out.append(_token_expr(template, name))
        else:
            out.append(exprs[name])
    return "".join(out)


def _token_expr(template: TemplateConfig, name: str) -> str:
    """A special token as Jinja: the template's string, or (null) the tokenizer's variable."""
    token = template.bos_token if name == "bos" else template.eos_token
    return "{{ " + (f"{name}_token" if token is None else _jinja_str(token)) + " }}"


def to_jinja(template: TemplateConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> str:
    """A Hugging Face `chat_template` that renders exactly like training.

    It begins with the BOS token, as chat templates do (`apply_chat_template` tokenizes without
    adding special tokens). SentencePiece-style tokenizers that add a word-boundary space only at
    the very start of the text would then tokenize the first word differently than training does
    (`<s>A` vs `<s>▁A`); given the tokenizer, the template writes BOS followed by whatever joiner
    (nothing or one space) makes `apply_chat_template(..., tokenize=True)` give exactly the training ids.
    """
    check_template(template)
    if tokenizer is not None:
        template = with_special_tokens(template, tokenizer)
    joiner = "" if tokenizer is None else _bos_joiner(template, tokenizer)
    system_in_user = "{system}" in template.user_format
    sys_part = _jinja_format(template.system_format, {"system": "{{ ns.system }}"}, template)
    gen = generation_prompt(template)
    prefix_fmt, suffix_fmt = template.assistant_format.split("{content}", 1)
    user_exprs = {
        "role": "{{ " + _jinja_str(template.roles[USER]) + " }}",
        "content": "{{ message['content'] }}",
        "system": "{% if loop.first and ns.system %}" + sys_part + "{% endif %}",
    }
    asst_exprs = {"role": "{{ " + _jinja_str(template.roles[ASSISTANT]) + " }}", "content": "{{ message['content'] }}"}
    user = _jinja_format(template.user_format, user_exprs, template)
    assistant = (
        _jinja_format(prefix_fmt.replace("{role}", template.roles[ASSISTANT]), {}, template)
        + "{{ message['content'] }}"
        + _jinja_format(suffix_fmt, asst_exprs, template)
    )
    # A leading {bos} in the first user turn is the one BOS the template writes up front.
    user_first = user
    bos_lit = _token_expr(template, "bos")
    if user.startswith(bos_lit):
        user_first = user[len(bos_lit):]
    parts = [
        "{%- set ns = namespace(system=" + _jinja_str(template.system) + ") -%}",
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set ns.system = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}"
        "{%- else -%}{%- set loop_messages = messages -%}{%- endif -%}",
        "{{ bos_token }}" + ("{{ " + _jinja_str(joiner) + " }}" if joiner else ""),
        ("" if system_in_user else "{%- if ns.system -%}" + sys_part + "{%- endif -%}"),
        "{%- for message in loop_messages -%}",
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}",
        "{%- if message['role'] == 'user' -%}{%- if loop.first -%}" + user_first + "{%- else -%}" + user
        + "{%- endif -%}",
        "{%- else -%}{% generation %}" + assistant + "{% endgeneration %}{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}" + _jinja_format(gen, {}, template) + "{%- endif -%}",
    ]
    return "".join(parts)


def _bos_joiner(template: TemplateConfig, tokenizer: PreTrainedTokenizerBase) -> str:
    """Nothing or a space after BOS: whichever reproduces the training ids on a probe conversation."""
    probe = [{"role": USER, "content": "Hello there"}, {"role": ASSISTANT, "content": "Hi"}]
    want, _ = encode_conversation(probe, tokenizer, template)
    text = render_spans(template, None, [(USER, "Hello there"), (ASSISTANT, "Hi")])[0]
    bos = tokenizer.bos_token or ""
    for joiner in ("", " "):
        got = tokenizer(bos + joiner + text, add_special_tokens=False)["input_ids"]
        if list(got) == list(want):
            return joiner
    return ""
