"""The LR multipliers equal the Hugging Face Trainer's schedules step for step."""

from __future__ import annotations

import pytest
import torch
from transformers import optimization as hf

from vicuna_exp.backends import lr_multiplier

RUNS = [(36, 2), (100, 3), (10, 0), (7, 7), (1, 0), (1200, 36)]


def reference(schedule: str, total: int, warmup: int, min_ratio: float):
    """The Trainer's own scheduler for this run, as a function of the update index."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    if schedule == "cosine" and min_ratio:
        sched = hf.get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, total, min_lr_rate=min_ratio)
    elif schedule == "cosine":
        sched = hf.get_cosine_schedule_with_warmup(opt, warmup, total)
    elif schedule == "linear":
        sched = hf.get_linear_schedule_with_warmup(opt, warmup, total)
    else:
        sched = hf.get_constant_schedule_with_warmup(opt, warmup)
    return sched.lr_lambdas[0]


@pytest.mark.parametrize(("total", "warmup"), RUNS)
@pytest.mark.parametrize(("schedule", "min_ratio"), [("cosine", 0.0), ("cosine", 0.1), ("linear", 0.0),
                                                     ("constant", 0.0)])
def test_every_update_of_a_run_matches_the_reference(schedule: str, min_ratio: float, total: int,
                                                     warmup: int) -> None:
    ours = lr_multiplier(schedule, total_steps=total, warmup_steps=warmup, min_ratio=min_ratio)
    ref = reference(schedule, total, warmup, min_ratio)
    assert [ours(k) for k in range(total)] == pytest.approx([ref(k) for k in range(total)], rel=1e-12, abs=1e-15)


def test_warmup_starts_at_zero_as_the_reference_does() -> None:
    """Cosine with 3 warmup steps: 0, 1/3, 2/3 of the peak, then the decay from the peak."""
    f = lr_multiplier("cosine", total_steps=10, warmup_steps=3, min_ratio=0.0)
    assert [f(k) for k in range(4)] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])
