"""Optuna searches: a real 4-trial study of the tiny model, continued after an interruption, shared
by two concurrent invocations; a failing trial; the bad inputs. One study dir is shared by the tests
in order (module-scoped), so the suite trains each trial once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vicuna_exp import search
from vicuna_exp.cli import main as cli_main
from vicuna_exp.report import main as report_main

# Six steps a trial, a checkpoint after each: an interruption finds one to resume from.
SMALL = ["trainer.max_steps=6", "trainer.save_every_steps=1", "trainer.micro_batch_size=2",
         "trainer.global_batch_size=2", "trainer.eval_max_rows=2", "trainer.eval_every_steps=null",
         "trainer.save_final=false", "logger=none", "model.hidden_size=64", "model.intermediate_size=128",
         "model.num_hidden_layers=2"]


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("search") / "lr_search"


pytestmark = pytest.mark.usefixtures("tiny_sweep_env")  # tests/sweep/conftest.py


def _args(study_dir: Path, n_trials: int, *extra: str) -> list[str]:
    return ["sweep", "lr_search", *SMALL, f"hydra.sweeper.n_trials={n_trials}", f"hydra.sweep.dir={study_dir}", *extra]


def _study(study_dir: Path):
    import optuna

    return optuna.load_study(study_name="lr_search", storage=search.make_storage(_settings(study_dir)))


def _settings(study_dir: Path) -> search.StudySettings:
    return search.StudySettings(sweep_dir=study_dir, study_name="lr_search", storage=None, direction="minimize",
                                objective="best_eval_loss", n_trials=1, n_jobs=1, sampler={})


def _summaries(study_dir: Path) -> dict[str, str]:
    return {p.parent.name: p.read_text() for p in study_dir.glob("*/summary.json")}


def test_a_4_trial_study_finishes_and_reports_the_best_trial_of_its_storage(study_dir: Path) -> None:
    assert cli_main(_args(study_dir, 4)) == 0
    study = _study(study_dir)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    record = json.loads((study_dir / "search.json").read_text())
    best = study.best_trial
    assert (record["best"]["number"], record["best"]["value"], record["best"]["params"]) == \
        (best.number, best.value, best.params)
    assert record["best"]["run_dir"] == best.user_attrs["run_dir"]
    summary = json.loads((study_dir / best.user_attrs["run_dir"] / "summary.json").read_text())
    assert summary["best_eval_loss"] == best.value
    groups = {o for text in _summaries(study_dir).values() for o in json.loads(text)["overrides"]
              if o.startswith("logger.group=")}
    assert len(groups) == 1 and groups.pop().startswith("logger.group=lr_search-")  # one wandb group per study
    assert sorted(_summaries(study_dir)) == sorted(t.user_attrs["run_dir"] for t in study.trials)
    assert all(name.startswith("optim.lr=") for name in _summaries(study_dir))  # named from the params alone

    assert report_main([str(study_dir)]) == 0
    md = (study_dir / "report.md").read_text()
    assert f"Best: trial {best.number}, best_eval_loss {best.value:.6g}" in md
    rows = [line for line in md.splitlines() if line.startswith("| 1 | ") or line.startswith("| 4 | ")]
    assert rows[0].startswith(f"| 1 | {best.number} | complete |")  # ranked by the objective
    for png in ("report_optimization_history.png", "report_param_importances.png"):
        assert (study_dir / png).stat().st_size > 1000
    assert "data:image/png;base64," in (study_dir / "report.html").read_text()

    before = _summaries(study_dir)
    assert cli_main(_args(study_dir, 4)) == 0  # n_trials is the total: a finished study runs no trial
    assert len(_study(study_dir).trials) == 4 and _summaries(study_dir) == before


def test_an_interrupted_study_continued_reruns_no_completed_trial(study_dir: Path) -> None:
    completed = _summaries(study_dir)

    def preempt_once_checkpointed() -> None:  # SIGTERM, as a spot preemption sends it, mid-trial
        deadline = time.monotonic() + 120
        while not any(study_dir.glob("*/checkpoints/step_00000001")) and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # should the trial have ended first
    watcher = threading.Thread(target=preempt_once_checkpointed, daemon=True)
    try:
        watcher.start()
        assert cli_main(_args(study_dir, 5)) == 75  # the trial saved and ended resumable
        watcher.join(timeout=10)
    finally:
        signal.signal(signal.SIGTERM, previous)
    study = _study(study_dir)
    assert [t.state.name for t in study.trials][4:] == ["FAIL", "WAITING"]  # queued again to resume
    interrupted = study.trials[4]

    assert cli_main(_args(study_dir, 5)) == 0
    study = _study(study_dir)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4 + ["FAIL", "COMPLETE"]
    resumed = study.trials[5]
    assert resumed.params == interrupted.params and resumed.user_attrs["resumes"] == 4
    summaries = _summaries(study_dir)
    assert {k: summaries[k] for k in completed} == completed  # no completed trial ran again
    summary = json.loads(summaries[resumed.user_attrs["run_dir"]])
    assert summary["status"] == "completed" and summary["resumed_from_step"] >= 1  # from its checkpoint


def test_two_concurrent_invocations_share_one_study(study_dir: Path) -> None:
    other = subprocess.Popen([sys.executable, "-m", "vicuna_exp", *_args(study_dir, 8)],
                             env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    opened = threading.Event()

    def drain() -> None:  # its output, read as it comes; the study is open once it says so
        for line in other.stdout:
            lines.append(line)
            if line.startswith("[optuna] study"):
                opened.set()
        opened.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        assert opened.wait(timeout=120)
        code = cli_main(_args(study_dir, 8))  # while the other trains its first trial
        other.wait(timeout=300)
        reader.join(timeout=10)
    finally:
        other.kill()
    assert (code, other.returncode) == (0, 0), "".join(lines)
    study = _study(study_dir)
    counted = search.counted_trials(study)
    assert len(counted) == 8 and all(t.state.name == "COMPLETE" for t in counted)
    assert len({t.number for t in study.trials}) == len(study.trials)  # every trial once
    assert len({json.dumps(t.params, sort_keys=True) for t in counted}) == 8
    assert len({t.user_attrs["run_dir"] for t in counted}) == 8
    assert len({t.user_attrs["owner"] for t in counted[5:]}) == 2  # both ran trials of it


def test_another_space_on_an_existing_study_is_refused_naming_the_difference(
        study_dir: Path, capsys: pytest.CaptureFixture) -> None:
    before = len(_study(study_dir).trials)
    assert cli_main(_args(study_dir, 9, "optim.lr=tag(log, interval(1e-4, 1e-3))")) == 2
    err = capsys.readouterr().err
    assert "optim.lr: tag(log, interval(1e-05, 0.01)) there, tag(log, interval(0.0001, 0.001)) here" in err
    assert "hydra.sweeper.study_name" in err and "Traceback" not in err
    assert len(_study(study_dir).trials) == before


def test_a_failing_trial_does_not_stop_the_study(tmp_path: Path) -> None:
    code = cli_main(["train", "-m", "hydra/sweeper=optuna", "optim.lr=interval(-0.003, 0.003)",
                     "hydra.sweeper.n_trials=3", *SMALL, "trainer.max_steps=2", f"hydra.sweep.dir={tmp_path}"])
    assert code == 1
    record = json.loads((tmp_path / "search.json").read_text())
    states = [t["state"] for t in record["trials"]]
    assert len(states) == 3 and "fail" in states and "complete" in states
    for t in record["trials"]:
        assert (t["state"] == "fail") == (t["params"]["optim.lr"] <= 0)
        if t["state"] == "fail":
            assert "optim.lr" in t["error"]


def test_an_objective_no_summary_holds_exits_2_after_the_first_trial(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli_main(["train", "-m", "hydra/sweeper=optuna", "optim.lr=interval(0.001, 0.003)",
                     "hydra.sweeper.n_trials=3", "hydra.sweeper.objective=best_eval_los", *SMALL,
                     "trainer.max_steps=1", f"hydra.sweep.dir={tmp_path}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "'best_eval_los' is not a key of summary.json" in err and "best_eval_loss" in err and "final_loss" in err
    assert len(json.loads((tmp_path / "search.json").read_text())["trials"]) == 1


def test_a_space_on_a_key_the_schema_lacks_exits_2_before_any_trial(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli_main(["train", "-m", "hydra/sweeper=optuna", "optim.lrr=interval(0.001, 0.003)",
                     f"hydra.sweep.dir={tmp_path / 'study'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "optim.lrr" in err and "Traceback" not in err
    assert not (tmp_path / "study").exists()


def test_plan_prices_a_study_as_n_trials_times_its_dearest_point(capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["plan", "sweep=lr_search", "hydra.sweeper.n_trials=5"]) == 0
    out = capsys.readouterr().out
    assert "trainer.epochs=3" in out.splitlines()[2]  # the most epochs is the dearest corner
    assert "a study of 5 trials costs at most 5 x that" in out


def test_the_same_seed_proposes_the_same_points_through_an_interruption(tmp_path: Path) -> None:
    """Without training: a deterministic objective told directly; one study is interrupted once."""
    space, _ = search.parse_space(["x=tag(log, interval(1e-5, 1e-2))", "y=range(1, 4)", "z=choice(a, b)"])

    def run(root: Path, interrupt_at: int | None) -> list[dict]:
        s = search.StudySettings(sweep_dir=root, study_name="s", storage=None, direction="minimize",
                                 objective="v", n_trials=12, n_jobs=1,
                                 sampler={"_target_": "optuna.samplers.TPESampler", "seed": 7, "n_startup_trials": 4})
        study = search.open_study(s, space)
        while trials := search.propose(study, s, space, 1):
            (t,) = trials
            if t.number == interrupt_at:
                search.requeue_interrupted(study, t.number, t.params, "test")
                continue
            study.tell(t, abs(t.params["x"] - 1e-3) + t.params["y"] / 10 + (t.params["z"] == "b"))
        return [t.params for t in search.counted_trials(study)]

    assert run(tmp_path / "a", None) == run(tmp_path / "b", 5)
