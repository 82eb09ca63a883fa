"""Sweep files and planning: names, job dirs, wandb group, bad input. No training here."""

from __future__ import annotations

from pathlib import Path

import pytest

from vicuna_exp import sweep
from vicuna_exp.config import conf_dir
from vicuna_exp.errors import UsageError

SHIPPED = ["backend", "base_model", "context_length", "finetune_method", "model_size", "recipe_grid"]
SEARCHES = ["lr_search"]  # Optuna studies: tests/sweep/test_search.py


def test_shipped_sweeps_are_listed() -> None:
    assert sweep.available_sweeps() == sorted(SHIPPED + SEARCHES)


def test_the_lr_search_spec_reads_its_space_and_study_settings() -> None:
    spec = sweep.load_spec("lr_search")
    assert spec.axes == {} and spec.n_trials == 8 and spec.objective == "best_eval_loss"
    assert spec.direction == "minimize"
    assert spec.search == {"optim.lr": "tag(log, interval(1e-5, 1e-2))", "optim.warmup_ratio": "interval(0, 0.1)",
                           "trainer.epochs": "range(1, 4)"}
    with pytest.raises(UsageError, match="a search"):
        sweep.plan_sweep(spec, [])


def test_a_spec_with_both_axes_and_search_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "both.yaml"
    path.write_text("axes: {context: ['512']}\nsearch: {optim.lr: 'interval(1e-5, 1e-3)'}\n")
    with pytest.raises(UsageError, match="exclude each other"):
        sweep.load_spec(str(path))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_sweep_plans_and_composes(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = sweep.load_spec(name)
    for key, values in spec.axes.items():
        group = conf_dir() / key
        missing = [v for v in values if group.is_dir() and not (group / f"{v}.yaml").exists()]
        assert not missing, f"sweeps/{name}.yaml: conf/{key}/ has no {', '.join(missing)}"
    monkeypatch.setenv("LLAMA_ROOT", "/weights")
    plan = sweep.plan_sweep(spec, [])
    n_jobs = max(1, len(spec.arms))
    for values in spec.axes.values():
        n_jobs *= len(values)
    assert len(plan.jobs) == n_jobs
    assert plan.sweep_dir == Path("outputs/sweeps") / name
    sweep.check_compose(plan)


def test_context_sweep_holds_tokens_per_step_constant() -> None:
    spec = sweep.load_spec("context_length")
    assert spec.axes == {"context": ["512", "2048"]}
    assert "trainer.tokens_per_step=65536" in spec.fixed
    plan = sweep.plan_sweep(spec, [])
    assert all("trainer.tokens_per_step=65536" in job for job in plan.jobs)


def test_plan_names_jobs_by_their_axes_and_lets_the_command_line_win() -> None:
    spec = sweep.load_spec("context_length")
    plan = sweep.plan_sweep(spec, ["context=512", "optim.lr=1e-3,2e-3", "trainer.max_steps=3",
                                   "hydra.sweep.dir=/tmp/x", "hydra/launcher=joblib"])
    assert [sorted(j) for j in plan.jobs] == [
        sorted(["context='512'", "trainer.tokens_per_step=65536", "optim.lr=0.001", "trainer.max_steps=3",
                f"logger.group={plan.group}"]),
        sorted(["context='512'", "trainer.tokens_per_step=65536", "optim.lr=0.002", "trainer.max_steps=3",
                f"logger.group={plan.group}"]),
    ]
    assert plan.name_keys == ["context", "optim.lr"]
    assert plan.sweep_dir == Path("/tmp/x")
    assert "hydra/launcher=joblib" in plan.hydra_overrides
    excluded = next(o for o in plan.hydra_overrides if o.startswith("hydra.job.config.override_dirname.exclude_keys="))
    assert "trainer.tokens_per_step" in excluded and "trainer.max_steps" in excluded and "optim.lr" not in excluded
    assert sweep.job_dirname("context='512',optim.lr=0.001") == "context=512,optim.lr=0.001"
    assert sweep.job_dirname("model.path=/a/b") == "model.path=_a_b"


def test_one_wandb_group_per_sweep_definition() -> None:
    spec = sweep.load_spec("context_length")
    a, b = sweep.plan_sweep(spec, []), sweep.plan_sweep(spec, [])
    assert a.group == b.group and a.run_id != b.run_id
    assert sweep.plan_sweep(spec, ["optim.lr=1e-4"]).group != a.group
    assert sweep.plan_sweep(spec, ["logger.group=mine"]).group == "mine"


def test_unknown_sweep_lists_the_available_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert sweep.main(["context_lenght"]) == 2
    err = capsys.readouterr().err
    assert "unknown sweep 'context_lenght'" in err
    assert "available sweeps: " + ", ".join(sorted(SHIPPED + SEARCHES)) in err
    assert sweep.main([]) == 2
    assert sweep.main(["--help"]) == 0


def test_bad_sweep_files_and_bad_keys_fail_before_any_job(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("axes: {context: [512]}\nfixd: [a=1]\n")
    with pytest.raises(UsageError, match="unknown key.*fixd"):
        sweep.load_spec(str(bad))
    bad.write_text("axes: {}\n")
    with pytest.raises(UsageError, match="axes"):
        sweep.load_spec(str(bad))

    ok = tmp_path / "mini.yaml"
    ok.write_text("axes:\n  optim.lr: [0.001, 0.002]\nfixed: [trainer.max_stepz=2]\n")
    out = tmp_path / "out"
    assert sweep.main([str(ok), f"hydra.sweep.dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "trainer.max_stepz" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert sweep.main(["context_length", "-m"]) == 2


def test_bad_launcher_option_fails_before_any_job(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert sweep.main(["context_length", "hydra/launcher=jobli", f"hydra.sweep.dir={out}"]) == 2
    assert "unknown option 'jobli' for hydra/launcher" in capsys.readouterr().err
    assert not out.exists()
