"""Reading a judge's reply: a 1-10 rating or an A/B/tie verdict, or nothing.

A reply without a clear verdict is unparseable: counted and listed, never scored. Judges
explain first and conclude last, so when a reply holds several candidates the last one wins.
"""

from __future__ import annotations

import re

_RATING_DOUBLE = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_RATING_WORD = re.compile(r"rating\s*:?\s*\[?\s*(\d+(?:\.\d+)?)\s*\]?", re.IGNORECASE)
_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")

UNPARSEABLE_SCORE = -1  # FastChat's marker for a single judgment without a rating
WINNERS = ("model_1", "model_2", "tie")


def parse_rating(text: str) -> float | None:
    """The rating of `Rating: [[x]]` (or `[[x]]`, or `Rating: x`), if it is within 1-10."""
    matches = _RATING_DOUBLE.findall(text) or _RATING_WORD.findall(text)
    if not matches:
        return None
    value = float(matches[-1])
    return value if 1.0 <= value <= 10.0 else None


def parse_verdict(text: str) -> str | None:
    """'A', 'B' or 'C' (tie) from `[[A]]`, `[[B]]`, `[[C]]`; None when absent."""
    matches = _VERDICT.findall(text)
    return matches[-1] if matches else None


def winner(verdict: str | None, a_is_model_1: bool) -> str:
    """A verdict as FastChat's `g1_winner` / `g2_winner`: model_1, model_2, tie or error."""
    if verdict is None:
        return "error"
    if verdict == "C":
        return "tie"
    return "model_1" if (verdict == "A") == a_is_model_1 else "model_2"


def combine(g1_winner: str, g2_winner: str) -> str | None:
    """Both orders agree: that winner; they disagree: a tie; either unparseable: None (ungraded)."""
    if g1_winner not in WINNERS or g2_winner not in WINNERS:
        return None
    return g1_winner if g1_winner == g2_winner else "tie"
