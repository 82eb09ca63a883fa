"""Where a run writes is checked before any work: a missing or unusable location is exit 2 naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

from vicuna_exp.errors import UsageError
from vicuna_exp.preflight import check_output_location


def test_a_location_under_a_file_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match=f"hydra.run.dir={tmp_path}/file/run: .*file is not a directory"):
        check_output_location(tmp_path / "file" / "run", "hydra.run.dir")


def test_a_missing_location_that_can_be_made_is_fine(tmp_path: Path) -> None:
    check_output_location(tmp_path / "not" / "yet" / "there", "hydra.run.dir")
    assert not (tmp_path / "not").exists()  # checked, not created


def test_cli_names_the_path_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from vicuna_exp.cli import main

    (tmp_path / "file").write_text("")
    assert main(["train", "logger=none", f"hydra.run.dir={tmp_path}/file/run"]) == 2
    assert f"hydra.run.dir={tmp_path}/file/run" in capsys.readouterr().err


def test_a_sweep_checks_its_sweep_dir_before_any_job(tmp_path: Path, tmpfs, capsys: pytest.CaptureFixture) -> None:
    from vicuna_exp.cli import main

    (tmp_path / "file").write_text("")
    sweep = ["train", "-m", "logger=none", "optim.lr=1e-5,2e-5"]
    assert main([*sweep, f"hydra.sweep.dir={tmp_path}/file/sweep"]) == 2
    assert f"hydra.sweep.dir={tmp_path}/file/sweep: {tmp_path}/file is not a directory" in capsys.readouterr().err

    small = tmpfs.mount("512k")  # less than the least a job writes (.hydra/, config, metrics, summary)
    assert main([*sweep, f"hydra.sweep.dir={small}/sweep"]) == 2
    assert f"hydra.sweep.dir={small}/sweep: only 512.0 KiB free on its disk" in capsys.readouterr().err
    assert not (small / "sweep").exists()  # nothing was started
