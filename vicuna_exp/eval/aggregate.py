"""The arithmetic of a judged evaluation, on judgment lines in FastChat's formats.

Pure functions, no files: mean scores per model, turn and category; relative total score
(the Vicuna blog's "model total / reference total", over the items both were graded on);
win / loss / tie and the adjusted win rate (win + 0.5 tie) / n. Unparseable judgments
(score -1, winner "error") are counted apart and never enter a mean or a rate.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vicuna_exp.eval.verdicts import combine

UNKNOWN_CATEGORY = "(unknown)"


@dataclass
class Mean:
    total: float = 0.0
    n: int = 0

    def add(self, x: float) -> None:
        self.total += x
        self.n += 1

    @property
    def value(self) -> float | None:
        return self.total / self.n if self.n else None


@dataclass
class ModelScores:
    model: str
    overall: Mean = field(default_factory=Mean)
    by_turn: dict[int, Mean] = field(default_factory=lambda: defaultdict(Mean))
    by_category: dict[str, Mean] = field(default_factory=lambda: defaultdict(Mean))
    unparseable: int = 0


def is_scored(row: Mapping[str, Any]) -> bool:
    s = row.get("score")
    return isinstance(s, (int, float)) and not isinstance(s, bool) and s >= 0


def single_scores(rows: Iterable[Mapping[str, Any]], categories: Mapping[Any, str]) -> dict[str, ModelScores]:
    """Per model: mean score overall, per turn and per question category."""
    out: dict[str, ModelScores] = {}
    for row in rows:
        ms = out.setdefault(row["model"], ModelScores(row["model"]))
        if not is_scored(row):
            ms.unparseable += 1
            continue
        s = float(row["score"])
        ms.overall.add(s)
        ms.by_turn[int(row["turn"])].add(s)
        ms.by_category[categories.get(row["question_id"], UNKNOWN_CATEGORY)].add(s)
    return out


def relative_total(rows: Iterable[Mapping[str, Any]], model: str, reference: str) -> tuple[float | None, int]:
    """(model total / reference total, number of items) over the (question, turn) items both
    models were graded on, so a missing or unparseable judgment cannot tilt the ratio."""
    scores: dict[str, dict[tuple[Any, int], float]] = {model: {}, reference: {}}
    for row in rows:
        if row["model"] in scores and is_scored(row):
            scores[row["model"]][(row["question_id"], int(row["turn"]))] = float(row["score"])
    common = scores[model].keys() & scores[reference].keys()
    ref_total = sum(scores[reference][k] for k in common)
    if not common or ref_total == 0:
        return None, len(common)
    return sum(scores[model][k] for k in common) / ref_total, len(common)


@dataclass
class WinLoss:
    win: int = 0
    loss: int = 0
    tie: int = 0

    @property
    def n(self) -> int:
        return self.win + self.loss + self.tie

    def _rate(self, x: float) -> float | None:
        return x / self.n if self.n else None

    @property
    def win_rate(self) -> float | None:
        return self._rate(self.win)

    @property
    def loss_rate(self) -> float | None:
        return self._rate(self.loss)

    @property
    def adjusted(self) -> float | None:
        """The adjusted win rate: a tie counts half a win."""
        return self._rate(self.win + 0.5 * self.tie)


@dataclass
class ModelRecord:
    model: str
    overall: WinLoss = field(default_factory=WinLoss)
    by_category: dict[str, WinLoss] = field(default_factory=lambda: defaultdict(WinLoss))
    opponents: set[str] = field(default_factory=set)
    unparseable: int = 0


def pair_result(row: Mapping[str, Any]) -> str | None:
    """model_1, model_2 or tie for one pairwise line (both orders combined); None if unparseable."""
    return combine(str(row.get("g1_winner")), str(row.get("g2_winner")))


def win_rates(rows: Iterable[Mapping[str, Any]], categories: Mapping[Any, str],
              baseline: str | None = None) -> dict[str, ModelRecord]:
    """Win / loss / tie per model against every opponent it met (only the baseline, if given;
    the baseline itself then gets no row of its own)."""
    out: dict[str, ModelRecord] = {}
    for row in rows:
        m1, m2 = row["model_1"], row["model_2"]
        result = pair_result(row)
        cat = categories.get(row["question_id"], UNKNOWN_CATEGORY)
        for me, other, my_win in ((m1, m2, "model_1"), (m2, m1, "model_2")):
            if baseline and (me == baseline or other != baseline):
                continue
            rec = out.setdefault(me, ModelRecord(me))
            rec.opponents.add(other)
            if result is None:
                rec.unparseable += 1
                continue
            for wl in (rec.overall, rec.by_category[cat]):
                if result == "tie":
                    wl.tie += 1
                elif result == my_win:
                    wl.win += 1
                else:
                    wl.loss += 1
    return out
