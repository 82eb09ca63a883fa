"""The CLI starts fast, lists its commands, and imports nothing heavy to do so."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vicuna_exp.cli import COMMANDS, main

HEAVY = ("torch", "transformers", "deepspeed", "datasets", "wandb")


def test_help_lists_commands(capsys: pytest.CaptureFixture) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("train", "prepare", "plan", "sweep", "report", "eval"):
        assert name in out


def test_startup_imports_no_heavy_library() -> None:
    code = (
        "import sys, time; t=time.perf_counter(); from vicuna_exp.cli import main; main(['--help']); "
        f"bad=[m for m in {HEAVY!r} if m in sys.modules]; assert not bad, bad; "
        "from vicuna_exp import config; bad=[m for m in "
        f"{HEAVY!r} if m in sys.modules]; assert not bad, ('config', bad)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)


def test_unknown_command_is_usage_error(capsys: pytest.CaptureFixture) -> None:
    assert main(["trian"]) == 2
    assert "train" in capsys.readouterr().err


def test_train_cfg_job_prints_the_config(capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--cfg", "job", "optim.lr=0.5"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.5" in out and "micro_batch_size" in out


def test_train_help(capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--help"]) == 0
    assert "model" in capsys.readouterr().out


def test_every_command_target_is_importable() -> None:
    import importlib

    for name, cmd in COMMANDS.items():
        if cmd.target:
            module, _, func = cmd.target.partition(":")
            assert callable(getattr(importlib.import_module(module), func)), name


@pytest.mark.parametrize("command", [["prepare"], ["plan"], ["plan", "hydra.run.dir=elsewhere"]])
def test_prepare_and_plan_leave_nothing_behind(command: list[str], tmp_path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    """They make no run dir (no outputs/, no .hydra/, no log file): prepare's output is the cache."""
    monkeypatch.chdir(tmp_path)
    assert main(command) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == (["elsewhere"] if "hydra.run.dir=elsewhere" in command
                                                          else [])
    if command == ["prepare"]:  # the prepared data went to the cache, as before
        assert capsys.readouterr().out.strip().splitlines()[-1].startswith(os.environ["VICUNA_EXP_CACHE"])
