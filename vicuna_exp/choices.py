"""A config choice as plain text, whichever form OmegaConf hands it in.

A key typed with an Enum in the schema reads back as the member, a key typed `str` as the text;
code that compares a choice with a name, or passes it on to a library, wants the text either way.
Imports nothing, so any module (the planner included) can use it.
"""

from __future__ import annotations

from enum import Enum


def choice_str(value: object) -> str:
    """`Precision.bf16` -> "bf16"; "bf16" -> "bf16"."""
    return str(value.value) if isinstance(value, Enum) else str(value)
