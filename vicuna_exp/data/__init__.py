"""ShareGPT data: loading, cleaning, splitting, templates and encoding, packing, cache.

Kept light on purpose (the CLI imports the config schema through this package): the public
helpers are imported lazily on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["encode_conversation"]


def __getattr__(name: str) -> Any:
    if name == "encode_conversation":
        from vicuna_exp.data.encode import encode_conversation

        return encode_conversation
    raise AttributeError(f"module 'vicuna_exp.data' has no attribute {name!r}")
