"""`plan -m` prints one table for every job of a sweep, before anything runs."""

from __future__ import annotations

import pytest

from vicuna_exp.cli import main


def test_multirun_plan_is_one_table(capsys: pytest.CaptureFixture) -> None:
    code = main(["plan", "-m", "context=512,2048", "model=llama-7b", "hardware=a100-80gb", "backend=single"])
    assert code == 0
    out = capsys.readouterr().out
    assert "context=512" in out and "context=2048" in out
    assert "2 jobs:" in out and "2 do not fit" in out  # 7B unsharded on one 80 GB GPU


def test_multirun_plan_with_a_bad_key_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", "-m", "context=512,2048", "optim.lrr=1"]) == 2
    assert "optim.lrr" in capsys.readouterr().err


def test_sky_sweep_flag_needs_a_name(capsys: pytest.CaptureFixture) -> None:
    assert main(["sky", "--sweep"]) == 2
