"""Sweeps whose arms are not a product of axes (`arms:`), text per step (`trainer.bytes_per_step`),
and the pricing of both new sweeps. No training here."""

from __future__ import annotations

from pathlib import Path

import pytest

from vicuna_exp import sweep
from vicuna_exp.config import config_hash, hash_form, validate
from vicuna_exp.errors import UsageError
from vicuna_exp.hydra_app import compose
from vicuna_exp.plan import multi
from vicuna_exp.plan.estimate import make_plan
from vicuna_exp.text_budget import bytes_per_token, tokens_for_bytes


def test_finetune_method_plans_one_job_per_named_arm() -> None:
    spec = sweep.load_spec("finetune_method")
    assert list(spec.arms) == ["full", "lora_r8", "lora_r64"]
    plan = sweep.plan_sweep(spec, ["optim.lr=1e-4,2e-4", "hydra.sweep.dir=/tmp/x"])
    assert sweep.job_arms(plan) == ["full", "full", "lora_r8", "lora_r8", "lora_r64", "lora_r64"]
    assert plan.name_keys == ["optim.lr"]  # the arms' own keys never name a dir: the arm does
    lora8 = plan.arms[1]
    assert "finetune.r=8" in lora8.jobs[0] and "finetune=lora" in lora8.jobs[0]
    subdir = next(o for o in lora8.hydra_overrides if o.startswith("hydra.sweep.subdir="))
    assert subdir.startswith("hydra.sweep.subdir='arm=lora_r8,${")
    excluded = next(o for o in lora8.hydra_overrides if o.startswith("hydra.job.config.override_dirname.exclude_keys="))
    assert "finetune.r" in excluded and "optim.lr" not in excluded
    assert len({p.run_id for p in plan.arms} | {plan.run_id}) == 1  # one sweep.json gathers every arm
    assert len({p.group for p in plan.arms}) == 1
    sweep.check_compose(plan)


@pytest.mark.parametrize(("arms", "needle"), [
    ("arms: [full]", "must map an arm name"),
    ("arms: {a: finetune=full}", "arms.a must be a list"),
    ("arms: {a: [finetune.r=8, finetune.r=16]}", "sets finetune.r twice"),
    ("arms: {a: ['finetune.r=8,16']}", "an arm is one point"),
    ("arms: {a: [finetune=full], b: [finetune=full]}", "arms.b and arms.a have the same overrides"),
    ("arms: {'a/b': [finetune=full]}", "names a job dir"),
    ("axes: {finetune: [full, lora]}\narms: {a: [finetune=full]}", "both an axis and set by an arm"),
])
def test_bad_arms_exit_2_before_any_job(arms: str, needle: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(arms + "\n")
    out = tmp_path / "out"
    assert sweep.main([str(bad), f"hydra.sweep.dir={out}"]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_an_arm_with_a_bad_key_stops_the_sweep_before_any_job(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "typo.yaml"
    bad.write_text("arms:\n  ok: [finetune=full]\n  typo: [finetune=lora, finetune.rank=8]\n")
    assert sweep.main([str(bad), f"hydra.sweep.dir={tmp_path / 'out'}"]) == 2
    assert "finetune.rank" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_both_new_sweeps_are_priced(capsys: pytest.CaptureFixture[str]) -> None:
    assert multi.main(["sweep=finetune_method", "experiment=vicuna-13b", "hardware=a100-80gb"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines() if line.startswith("arm=")] == [
        "arm=full", "arm=lora_r8", "arm=lora_r64"]
    assert "3 jobs" in out and " 8  a100-80gb" in out
    assert multi.main(["sweep=base_model", "hardware=a100-80gb"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("model=")]
    assert [r.split()[0] for r in rows] == ["model=llama2-7b", "model=llama3-8b", "model=mistral-7b", "model=qwen2.5-7b"]
    assert all(r.split()[1] == "8" and "a100-80gb" in r for r in rows)


def test_bytes_per_step_derives_whole_rows_per_rank() -> None:
    # 1 MB of text: 131 rows at 3.81 bytes/token (LLaMA-2 on ShareGPT), 109 at 4.46 (Llama-3), in 8s
    assert tokens_for_bytes(1_000_000, 3.81, 2048, 8) == 128 * 2048
    assert tokens_for_bytes(1_000_000, 4.46, 2048, 8) == 112 * 2048
    assert tokens_for_bytes(100, 4.0, 2048, 8) == 8 * 2048  # never less than a row per rank
    stats = {"splits": {"train": {"text_bytes": 9_000, "total_tokens": 3_000}}}
    assert bytes_per_token(stats) == 3.0
    with pytest.raises(UsageError, match="trainer.bytes_per_step"):
        bytes_per_token({"splits": {"train": {"total_tokens": 3_000}}})


def test_bytes_per_step_is_out_of_the_hash_at_null_and_excludes_tokens_per_step() -> None:
    cfg = compose([])
    assert cfg.trainer.bytes_per_step is None and "bytes_per_step" not in hash_form(cfg)["trainer"]
    assert config_hash(compose(["trainer.bytes_per_step=8192"])) != config_hash(cfg)
    with pytest.raises(UsageError, match="trainer.bytes_per_step: set it or trainer.tokens_per_step"):
        validate(compose(["trainer.bytes_per_step=8192", "trainer.tokens_per_step=4096"]))
    with pytest.raises(UsageError, match="trainer.bytes_per_step: must be > 0"):
        validate(compose(["trainer.bytes_per_step=0"]))
    # the rows come from the bytes, in whole rows per rank: global_batch_size no longer has to split
    validate(compose(["trainer.bytes_per_step=8192", "trainer.global_batch_size=3", "launcher.nproc_per_node=2",
                      "backend=ddp"]))


def test_the_planner_uses_the_assumed_bytes_per_token() -> None:
    plan = make_plan(compose(["experiment=vicuna-7b", "model=llama3-8b", "trainer.bytes_per_step=1000000",
                              "plan.bytes_per_token=4.46", "hardware=a100-80gb"]))
    assert plan.setup.global_batch == 112
    assert any("plan.bytes_per_token=4.46" in n for n in plan.notes)


def test_sky_writes_one_point_per_arm() -> None:
    from vicuna_exp.sky import sweep_points

    name, points = sweep_points("finetune_method")
    assert name == "finetune_method"
    assert [values for values, _ in points] == [["full"], ["lora_r8"], ["lora_r64"]]
    assert points[1][1] == ["finetune=lora", "finetune.r=8", "finetune.lora_alpha=16"]
