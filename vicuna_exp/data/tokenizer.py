"""Load the tokenizer a run uses: a local directory, or the packaged tiny one.

Only fast (Rust-backed) tokenizers are accepted: the pipeline needs character offsets for exact
masking and batched encoding across cores, and both exist only there. A directory holding only a
SentencePiece `tokenizer.model` is converted with SentencePiece's merge order (sentencepiece_merges.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from vicuna_exp.data.sentencepiece_merges import converted_from_sentencepiece, rank_merges_as_sentencepiece
from vicuna_exp.errors import UsageError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PACKAGED_TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "tokenizer"
# What a directory needs for a tokenizer to be built from it offline (besides vocab.json + merges.txt).
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model")
VOCABULARY_PREFIX = "vocabulary:"  # `vocabulary:llama3`: a real vocabulary built from its pinned package


def tokenizer_dir(path: str | None, *, key: str = "model.tokenizer") -> Path:
    """The directory a tokenizer setting names: a path, the packaged tiny tokenizer (None), or
    `vocabulary:NAME`, written once under the cache from its pinned package (vocabularies.py)."""
    if path is None:
        return PACKAGED_TOKENIZER_DIR
    if not str(path).startswith(VOCABULARY_PREFIX):
        return Path(path).expanduser()
    from vicuna_exp.data import vocabularies
    from vicuna_exp.data.cache import cache_root

    name = str(path).removeprefix(VOCABULARY_PREFIX)
    if name not in vocabularies.VOCABULARIES:
        raise UsageError(f"{key}={path}: unknown vocabulary; choose one of "
                         f"{', '.join(VOCABULARY_PREFIX + v for v in vocabularies.VOCABULARIES)}")
    reason = vocabularies.missing(name)
    if reason:
        raise UsageError(f"{key}={path}: {reason}")
    return vocabularies.build(name, cache_root(None) / "vocabularies")


def load_tokenizer(path: str | None, *, key: str = "model.tokenizer") -> PreTrainedTokenizerFast:
    """`AutoTokenizer.from_pretrained(path)` (local files only); None means the packaged tiny tokenizer,
    `vocabulary:NAME` a real vocabulary from a pinned package (`tokenizer_dir`).

    Raises UsageError naming `key` and the path when it is missing or cannot be loaded.
    """
    directory = tokenizer_dir(path, key=key)
    if not directory.is_dir():
        raise UsageError(f"{key}: tokenizer directory not found: {directory}")
    if not any((directory / name).is_file() for name in VOCABULARY_FILES) and not (
            (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()):
        held = sorted(p.name for p in directory.iterdir())[:12]
        raise UsageError(f"{key}: {directory} holds no vocabulary: it needs tokenizer.json (or, to convert "
                         f"offline, a tokenizer.model, or vocab.json with merges.txt); it holds "
                         f"{', '.join(held) if held else 'nothing'}")

    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:  # transformers raises many types (OSError, ValueError, KeyError...)
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"{key}: cannot load a tokenizer from {directory} offline: {first_line}") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise UsageError(f"{key}: {directory} gives a slow tokenizer; vicuna-exp needs a fast one (tokenizer.json)")
    if converted_from_sentencepiece(directory):  # transformers 5's conversion: SentencePiece's merge order
        from tokenizers import Tokenizer

        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        if rank_merges_as_sentencepiece(spec, directory / "tokenizer.model"):
            tokenizer._tokenizer = Tokenizer.from_str(json.dumps(spec))  # no public setter for the backend
    if tokenizer.eos_token_id is None:
        raise UsageError(f"{key}: the tokenizer in {directory} has no eos_token")
    return tokenizer


def pad_id(tokenizer: PreTrainedTokenizerFast) -> int:
    """LLaMA tokenizers have no pad token; padding positions are never attended or supervised, so any id works."""
    for candidate in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


class TokenIds(NamedTuple):
    """The special-token ids a model's config records (generation stops on `eos`)."""

    bos: int | None
    eos: int
    pad: int


LLAMA_TOKEN_IDS = TokenIds(bos=1, eos=2, pad=0)  # the LLaMA SentencePiece vocabulary's, and the packaged one's


def token_ids(tokenizer: PreTrainedTokenizerFast) -> TokenIds:
    """The tokenizer's own BOS (None when it has none, as Qwen's), EOS and padding ids."""
    return TokenIds(bos=tokenizer.bos_token_id, eos=int(tokenizer.eos_token_id), pad=pad_id(tokenizer))
