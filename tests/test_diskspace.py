"""A full disk for real, on a tmpfs the test mounts: the run ends with one line naming what, where,
how much was needed and how much was free; the partial write is removed and what was complete is
kept; exit 75 with a checkpoint to resume from, else 1; once space is freed the same command
resumes. A read-only or too small run dir is exit 2 before any work."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vicuna_exp.cli import main
from vicuna_exp.diskspace import DiskFull

# A small model (3.6 MiB checkpoints), a checkpoint every step and only the newest kept.
SMALL = ["logger=none", "trainer.micro_batch_size=2", "trainer.global_batch_size=4", "trainer.max_steps=2",
         "trainer.eval_every_steps=null", "trainer.eval_max_rows=4", "trainer.save_every_steps=1",
         "trainer.keep_last=1", "model.hidden_size=64", "model.intermediate_size=128", "model.num_hidden_layers=2",
         "context=512"]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]  # every line whole


def _steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in _lines(run_dir / "metrics.jsonl") if "loss" in r]


def test_run_dir_read_only_then_too_small_then_full_then_resumed(tmpfs, capsys: pytest.CaptureFixture) -> None:
    run_dir = tmpfs.mount("6m", read_only=True) / "run"
    args = ["train", *SMALL, f"hydra.run.dir={run_dir}"]

    assert main(args) == 2  # read-only: said before Hydra writes anything
    err = capsys.readouterr().err
    assert f"hydra.run.dir={run_dir}" in err and "read-only" in err and "cannot be created" in err
    assert not run_dir.exists()

    tmpfs.mount("2m")  # room for .hydra/, not for one checkpoint
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"hydra.run.dir={run_dir}" in err and "one checkpoint needs about" in err
    assert not (run_dir / "metrics.jsonl").exists()

    tmpfs.mount("6m")  # room for one checkpoint, not for the next beside it
    assert main(args) == 75
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if DiskFull.PREFIX in x)
    assert f"checkpoint step_00000002 to {run_dir / 'checkpoints'}: needed 3.6 MiB" in line and " free" in line
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000001"]  # partial removed, previous kept
    assert (ckpts / "step_00000001" / "trainer_state.json").is_file()
    assert _steps(run_dir) == [1, 2]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "interrupted" and s["exit_code"] == 75 and s["error"].startswith(DiskFull.PREFIX)
    assert "only" in (run_dir / "hydra_app.log").read_text()  # the warning before the save that failed

    tmpfs.mount("16m")  # space freed: the same command resumes
    assert main(args) == 0
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "completed" and s["resumed_from_step"] == 1
    assert _steps(run_dir) == [1, 2]


def test_prepared_cache_on_a_full_disk(tmpfs, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cache = tmpfs.mount("64k")
    run_dir = tmp_path / "run"
    args = ["train", *SMALL, "trainer.max_steps=1", "trainer.save_final=false", f"data.cache_dir={cache}",
            f"hydra.run.dir={run_dir}"]
    assert main(args) == 1  # no checkpoint to resume from
    err = capsys.readouterr().err
    assert f"{DiskFull.PREFIX} the prepared dataset to {cache}" in err
    assert not list((cache / "prepared").glob(".tmp-*"))  # the partial preparation was removed
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"

    tmpfs.mount("8m")
    assert main(args) == 0


def test_metrics_and_summary_stay_whole(tmpfs, capsys: pytest.CaptureFixture) -> None:
    from vicuna_exp import distributed as D
    from vicuna_exp.hydra_app import compose
    from vicuna_exp.tracking import Tracker, write_json_atomic
    from vicuna_exp.train import Recipe

    run_dir = tmpfs.mount("64k")
    cfg = compose(SMALL)
    write_json_atomic(run_dir / "summary.json", {"status": "running"})
    (run_dir / "ballast").write_bytes(b"\0" * 40_000)
    tracker = Tracker(cfg, run_dir, enabled=True, overrides=[], total_steps=10_000)
    logged = 0
    with pytest.raises(DiskFull, match=f"metrics to {run_dir / 'metrics.jsonl'}"):
        for logged in range(1, 10_000):  # noqa: B007 - the count is read after the loop
            tracker.log({"step": logged, "loss": 1.0, "note": "x" * 100})
    assert [r["step"] for r in _lines(run_dir / "metrics.jsonl")] == list(range(1, logged))
    with pytest.raises(DiskFull, match="summary.json"):
        write_json_atomic(run_dir / "summary.json", {"status": "completed", "padding": "x" * 100_000})
    assert json.loads((run_dir / "summary.json").read_text()) == {"status": "running"}
    assert sorted(os.listdir(run_dir)) == ["ballast", "metrics.jsonl", "summary.json"]  # no temporary left
    tracker.finish(1)

    Recipe(cfg, run_dir, [], D.DistInfo()).finish("failed", "x" * 100_000, 1)  # even the summary cannot fit
    assert "summary.json not written" in capsys.readouterr().err


def test_export_on_a_full_disk_keeps_the_final_checkpoint_and_the_rerun_exports(
        tmpfs, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from vicuna_exp.train import Recipe

    run_dir = tmpfs.mount("16m") / "run"
    args = ["train", *SMALL, "trainer.save_every_steps=null", f"hydra.run.dir={run_dir}"]
    ballast = run_dir.parent / "ballast"
    export = Recipe.export

    def fill_then_export(self: Recipe, out_dir: Path) -> None:  # another job filled the disk meanwhile
        free = os.statvfs(ballast.parent).f_bavail * os.statvfs(ballast.parent).f_frsize
        ballast.write_bytes(b"\0" * (free - 64 * 1024))
        export(self, out_dir)

    monkeypatch.setattr(Recipe, "export", fill_then_export)
    assert main(args) == 75  # the final checkpoint is complete: resumable
    line = next(x for x in capsys.readouterr().err.splitlines() if DiskFull.PREFIX in x)
    assert f"the final model to {run_dir / 'final'}: needed" in line and " free" in line
    assert not (run_dir / "final").exists()  # the partial export was removed
    assert (run_dir / "checkpoints" / "step_00000002" / "trainer_state.json").is_file()
    assert _steps(run_dir) == [1, 2]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "interrupted" and s["exit_code"] == 75 and s["error"].startswith(DiskFull.PREFIX)

    monkeypatch.setattr(Recipe, "export", export)
    ballast.unlink()  # space freed: the same command exports
    assert main(args) == 0
    assert (run_dir / "final" / "config.json").is_file()
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


def test_a_writer_that_leaves_its_file_open_still_frees_the_space(tmpfs) -> None:
    """DeepSpeed's checkpoint writers leave a file open when the disk fills: the exception's frames
    hold it, and a removed file's space comes back only once it is closed."""
    from vicuna_exp.diskspace import free_bytes, writing

    disk = tmpfs.mount("1m")
    partial = disk / "partial.bin"

    def leaky_writer() -> None:
        f = open(partial, "wb")  # noqa: SIM115 - left open on purpose, as such writers do
        while True:
            f.write(b"\0" * 65536)
            f.flush()

    with pytest.raises(DiskFull) as caught:
        with writing("a shard", disk, partial=partial):
            leaky_writer()
    assert not partial.exists()
    assert free_bytes(disk) > 900_000, "the removed file's space is still held by an open descriptor"
    assert caught.value.what == "a shard"
