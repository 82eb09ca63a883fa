"""Put a converted SentencePiece BPE's merges back in SentencePiece's order.

A directory with a SentencePiece `tokenizer.model` and no `tokenizer.json` (LLaMA-1's, many
Mistral-family ones) is converted by transformers at load. transformers 5 ranks the merges of
whitespace pieces first, where SentencePiece (score -1e9) merges them last: two spaces before a word
give `▁▁ world` against SentencePiece's `▁ ▁world` (64 of the first 292 ShareGPT conversations on a
32k vocabulary). The loader ranks the converted merges by SentencePiece's scores again, so the ids are
SentencePiece's, as the models' published tokenizer.json (made by transformers 4) has them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def converted_from_sentencepiece(directory: Path) -> bool:
    """Whether loading this directory converts a SentencePiece model (no tokenizer.json beside it)."""
    return (directory / "tokenizer.model").is_file() and not (directory / "tokenizer.json").is_file()


def rank_merges_as_sentencepiece(spec: dict[str, Any], model_file: Path) -> bool:
    """Rank a converted BPE's merges (tokenizer.json's `model.merges`, changed in place) as SentencePiece
    does: by the score of the piece a merge makes, highest first, ties in the converter's order.
    False when there is nothing to rank (not a BPE, or not a SentencePiece BPE model)."""
    import sentencepiece

    merges = spec.get("model", {}).get("merges")
    if spec.get("model", {}).get("type") != "BPE" or not merges:
        return False
    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    except (OSError, RuntimeError):
        return False  # not a SentencePiece model (a tiktoken file is also named tokenizer.model)
    pieces = [m if isinstance(m, list) else m.split(" ") for m in merges]
    scores = [sp.get_score(sp.piece_to_id(a + b)) for a, b in pieces]
    spec["model"]["merges"] = [merges[i] for i in sorted(range(len(merges)), key=lambda i: -scores[i])]
    return True
