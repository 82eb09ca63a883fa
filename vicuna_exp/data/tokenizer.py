"""Load the tokenizer a run uses: a local directory, or the packaged tiny one.

Only fast (Rust-backed) tokenizers are accepted: the pipeline needs character offsets for exact
masking and batched encoding across cores, and both exist only there.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from vicuna_exp.errors import UsageError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PACKAGED_TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "tokenizer"


def load_tokenizer(path: str | None, *, key: str = "model.tokenizer") -> PreTrainedTokenizerFast:
    """`AutoTokenizer.from_pretrained(path)` (local files only); None means the packaged tiny tokenizer.

    Raises UsageError naming `key` and the path when it is missing or cannot be loaded.
    """
    directory = PACKAGED_TOKENIZER_DIR if path is None else Path(path).expanduser()
    if not directory.is_dir():
        raise UsageError(f"{key}: tokenizer directory not found: {directory}")

    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:  # transformers raises many types (OSError, ValueError, KeyError...)
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"{key}: cannot load a tokenizer from {directory}: {first_line}") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise UsageError(f"{key}: {directory} gives a slow tokenizer; vicuna-exp needs a fast one (tokenizer.json)")
    if tokenizer.eos_token_id is None:
        raise UsageError(f"{key}: the tokenizer in {directory} has no eos_token")
    return tokenizer


def pad_id(tokenizer: PreTrainedTokenizerFast) -> int:
    """LLaMA tokenizers have no pad token; padding positions are never attended or supervised, so any id works."""
    for candidate in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
