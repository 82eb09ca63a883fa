"""The step plan: optimizer steps per epoch from each epoch's rows, and where every step falls."""

from __future__ import annotations

import pytest

from vicuna_exp.data.batching import StepPlan, plan_steps
from vicuna_exp.errors import UsageError


def rows(*per_epoch: int):
    """An epoch -> row count function (packing makes the count differ between epochs)."""
    return lambda epoch: per_epoch[epoch]


def test_whole_epochs_drop_the_last_partial_batch() -> None:
    plan = plan_steps(rows(10, 10, 10), global_batch_size=4, context_length=8, epochs=3)
    assert plan == StepPlan(per_epoch=(2, 2, 2), total=6)
    assert [plan.position(s) for s in range(1, 7)] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]


def test_a_fractional_epoch_trains_that_fraction_of_the_last_one() -> None:
    plan = plan_steps(rows(10, 10), global_batch_size=2, context_length=8, epochs=1.5)
    assert plan.per_epoch == (5, 2) and plan.total == 7
    assert plan.epoch_progress(5) == 1.0 and plan.epoch_progress(6) == 1.5


def test_a_token_budget_buys_steps_across_epochs_of_different_sizes() -> None:
    # 2 rows x 4 tokens = 8 token slots a step: 72 slots buy 9 steps, past the first epoch's 4
    plan = plan_steps(rows(9, 12, 8), global_batch_size=2, context_length=4, epochs=1, token_budget=72)
    assert plan.per_epoch == (4, 6) and plan.total == 9
    assert plan.position(4) == (0, 3) and plan.position(5) == (1, 0) and plan.position(9) == (1, 4)
    assert plan.epoch_progress(9) == pytest.approx(1 + 5 / 6, abs=1e-4)


def test_max_steps_stops_inside_an_epoch() -> None:
    plan = plan_steps(rows(10, 10, 10), global_batch_size=2, context_length=8, epochs=3, max_steps=7)
    assert plan.per_epoch == (5, 5, 5) and plan.total == 7 and plan.position(7) == (1, 1)
    with pytest.raises(AssertionError, match="past the planned"):
        StepPlan(per_epoch=(2,), total=2).position(3)


def test_every_step_has_its_own_place_in_order() -> None:
    plan = plan_steps(rows(23, 17, 30, 9), global_batch_size=3, context_length=8, epochs=4)
    places = [plan.position(s) for s in range(1, plan.total + 1)]
    assert places == sorted(set(places))
    assert all(0 <= index < plan.per_epoch[epoch] for epoch, index in places)


def test_fewer_rows_than_one_batch_is_a_usage_error_naming_the_key() -> None:
    with pytest.raises(UsageError, match=r"trainer.global_batch_size: 8 rows per step .* only 5 rows"):
        plan_steps(rows(5), global_batch_size=8, context_length=8, epochs=1)
