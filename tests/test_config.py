"""The config tree composes, and bad configs fail before anything heavy, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from vicuna_exp.cli import main
from vicuna_exp.config import conf_dir, config_hash, grad_accumulation_steps, micro_batch_sizes, validate
from vicuna_exp.errors import UsageError
from vicuna_exp.hydra_app import compose

GROUPS = sorted(p.name for p in conf_dir().iterdir() if p.is_dir() and p.name != "hydra" and any(p.glob("*.yaml")))


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_option_of_every_group_composes(group: str, option: str) -> None:
    cfg = compose([f"{group}={option}"])
    assert cfg is not None
    if group == "experiment" and option != "demo":
        assert cfg.experiment == option
        assert cfg.model.init == "pretrained"


def test_groups_named_by_the_issue_exist() -> None:
    for group in ("model", "context", "backend", "data", "template", "optim", "logger", "experiment"):
        assert group in GROUPS, group
    assert {"tiny", "llama-7b", "llama-13b", "llama2-7b", "llama2-13b"} <= set(_options("model"))
    assert {"512", "2048"} <= set(_options("context"))


def test_default_is_the_cpu_demo() -> None:
    cfg = compose([])
    assert cfg.model.name == "tiny" and cfg.model.init == "random"
    assert cfg.context.length == 512
    assert cfg.logger.name == "wandb"
    validate(cfg)


@pytest.mark.parametrize("size", ["7b", "13b"])
def test_published_recipe(size: str) -> None:
    cfg = compose([f"experiment=vicuna-{size}", "model.path=/weights"])
    t, o = cfg.trainer, cfg.optim
    assert cfg.model.name == f"llama-{size}"
    assert cfg.context.length == 2048
    assert t.global_batch_size == 128 and t.epochs == 3 and str(t.precision.value) == "bf16_mixed"
    assert o.lr == 2e-5 and o.weight_decay == 0 and o.warmup_ratio == 0.03 and o.schedule == "cosine"
    assert cfg.model.gradient_checkpointing is True
    assert grad_accumulation_steps(cfg) * t.micro_batch_size * cfg.launcher.nproc_per_node == 128
    validate(cfg)


def test_context_override_sets_length() -> None:
    assert compose(["context=2048"]).context.length == 2048


@pytest.mark.parametrize(
    "override,needle",
    [
        ("optim.lrr=0.1", "optim.lrr"),
        ("trainer.micro_batch_size=abc", "trainer.micro_batch_size"),
        ("model=llama-99b", "llama-7b"),
        ("nonsense.key=1", "nonsense"),
    ],
)
def test_composition_errors_exit_2_with_one_line(override: str, needle: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", override]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err


def test_misspelled_key_lists_valid_keys(capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "optim.lrr=0.1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'optim.lrr'" in err and "lr" in err and "weight_decay" in err


def test_unknown_group_option_lists_choices(capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "model=llama-99b"]) == 2
    err = capsys.readouterr().err
    assert "llama-99b" in err and "tiny" in err and "llama2-13b" in err


@pytest.mark.parametrize(
    "override,key",
    [
        ("optim.lr=-1", "optim.lr"),
        ("trainer.micro_batch_size=0", "trainer.micro_batch_size"),
        ("context.length=0", "context.length"),
        ("launcher.nproc_per_node=3", "trainer.global_batch_size"),  # 4 rows over 3 ranks
        ("model=llama-7b", "model.path"),  # a real model without weights
    ],
)
def test_value_checks_run_inside_the_job(override: str, key: str, capsys: pytest.CaptureFixture,
                                         tmp_path: Path) -> None:
    assert main(["train", override, "logger=none", f"hydra.run.dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err


def test_multirun_stops_up_front_on_a_bad_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["train", "-m", "optim.lrr=1,2", f"hydra.sweep.dir={tmp_path}"])
    assert code == 2
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # no job started


def test_micro_batch_size_is_a_cap_not_a_divisor() -> None:
    cfg = compose(["trainer.global_batch_size=10", "trainer.micro_batch_size=2", "launcher.nproc_per_node=2",
                   "backend=ddp"])
    assert micro_batch_sizes(cfg) == [2, 2, 1] and grad_accumulation_steps(cfg) == 3  # 5 rows per rank
    validate(cfg)
    big = compose(["trainer.global_batch_size=4", "trainer.micro_batch_size=16", "launcher.nproc_per_node=2",
                   "backend=ddp"])
    assert micro_batch_sizes(big) == [2]  # the cap binds only when a rank has more rows
    validate(big)


@pytest.mark.parametrize(("gbs", "nproc", "nearest"), [(4, 3, "3 or 6"), (4, 8, "8"), (10, 4, "8 or 12")])
def test_an_uneven_split_over_ranks_names_both_keys_and_valid_values(gbs: int, nproc: int, nearest: str) -> None:
    cfg = compose([f"trainer.global_batch_size={gbs}", f"launcher.nproc_per_node={nproc}", "backend=ddp"])
    with pytest.raises(UsageError) as err:
        validate(cfg)
    msg = str(err.value)
    assert msg.startswith("trainer.global_batch_size:") and f"launcher.nproc_per_node={nproc}" in msg
    assert f"nearest valid trainer.global_batch_size is {nearest}," in msg
    assert ("fewer than" in msg) == (gbs < nproc)


def test_an_uneven_token_budget_names_tokens_per_step() -> None:
    cfg = compose(["trainer.tokens_per_step=1536", "launcher.nproc_per_node=2", "backend=ddp"])  # 3 rows
    with pytest.raises(UsageError, match=r"^trainer.tokens_per_step: 3 rows per step cannot be split evenly"):
        validate(cfg)


def test_validate_rejects_bad_values_directly() -> None:
    cfg = compose([])
    cfg.trainer.tokens_per_step = 1000  # not a multiple of 512
    with pytest.raises(UsageError, match="trainer.tokens_per_step"):
        validate(cfg)


def test_tokens_per_step_derives_the_batch() -> None:
    cfg = compose(["context=2048", "trainer.tokens_per_step=65536", "trainer.micro_batch_size=4"])
    assert grad_accumulation_steps(cfg) == 8  # 65536 / 2048 = 32 rows = 4 x 8
    validate(cfg)


def test_config_hash_ignores_where_metrics_go() -> None:
    a, b = compose([]), compose(["logger=none"])
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(compose(["optim.lr=0.1"]))
    assert OmegaConf.is_config(a)


@pytest.mark.parametrize("nproc", [1, 2, 4, 3, 8])
def test_plan_works_on_the_default_for_every_gpu_count_the_batch_allows(nproc: int,
                                                                     capsys: pytest.CaptureFixture) -> None:
    code = main(["plan", "backend=fsdp", f"launcher.nproc_per_node={nproc}"])
    out, err = capsys.readouterr()
    if 4 % nproc == 0:
        assert code == 0 and f"{4 // nproc} row{'s' if nproc < 4 else ''} per GPU: 1 micro-batch of {4 // nproc}" in out
        assert "Verdict: fits" in out
    else:
        assert code == 2 and "trainer.global_batch_size" in err and f"launcher.nproc_per_node={nproc}" in err
        assert ("fewer than the 8 ranks" in err) == (nproc == 8)
