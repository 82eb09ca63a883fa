"""Text per optimizer step (`trainer.bytes_per_step`): the tokens per step each tokenizer needs to
hold the same amount of conversation text.

Bases with different vocabularies cut the same conversations into different numbers of tokens
(Llama-3's 128k vocabulary packs more text into a token than LLaMA-2's 32k one), so equal tokens
per step would give them unequal text per step. Under `trainer.bytes_per_step` each run measures
bytes per token on its own prepared train split (`stats.json`: the split's `text_bytes` over its
`total_tokens`) and trains at the tokens per step that carry that many bytes; the planner does the
same arithmetic with an assumed ratio (`plan.bytes_per_token`).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from vicuna_exp.errors import UsageError


def bytes_per_token(stats: dict[str, Any], split: str = "train") -> float:
    """UTF-8 bytes of conversation per token of the prepared split (`vicuna_exp.data.prepare`).

    The tokens are all the split's tokens, the template's included, so the ratio says how much
    conversation a token of training carries: tokens per step x ratio is the text per step. With
    one template for every arm the template's share is the same text in each."""
    s = stats.get("splits", {}).get(split) or {}
    text, tokens = s.get("text_bytes"), s.get("total_tokens")
    if not text or not tokens:
        raise UsageError(f"trainer.bytes_per_step: the prepared {split} split has no text to measure "
                         f"(text_bytes={text}, total_tokens={tokens})")
    return float(text) / float(tokens)


def tokens_for_bytes(bytes_per_step: int, ratio: float, context: int, world: int) -> int:
    """Token slots per step (rows x context) nearest to `bytes_per_step / ratio`, in whole rows that
    split evenly over `world` ranks, and at least one row per rank."""
    rows = bytes_per_step / ratio / context
    per_rank = max(1, round(rows / world))
    return per_rank * world * context


def derive(cfg: DictConfig, stats: dict[str, Any], world: int) -> dict[str, Any]:
    """Set `trainer.tokens_per_step` from `trainer.bytes_per_step` and the measured ratio, so every
    later reader of the batch size (the step plan, the backends, summary.json) sees it. Returns
    what was measured and derived, for `derived` in summary.json."""
    t = cfg.trainer
    ratio = bytes_per_token(stats)
    tokens = tokens_for_bytes(int(t.bytes_per_step), ratio, int(cfg.context.length), world)
    t.tokens_per_step = tokens
    return {"bytes_per_step": int(t.bytes_per_step), "bytes_per_token": round(ratio, 4),
            "bytes_per_step_held": round(tokens * ratio)}
