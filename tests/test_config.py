"""The config tree composes, and bad configs fail before anything heavy, naming the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from omegaconf import MISSING, OmegaConf

from vicuna_exp.cli import main
from vicuna_exp.config import (
    HASH_NEUTRAL,
    DdpBackendConfig,
    as_schema,
    conf_dir,
    config_hash,
    grad_accumulation_steps,
    load_option,
    micro_batch_sizes,
    typed_config,
    validate,
)
from vicuna_exp.data.config import DataConfig
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


# config_hash of the shipped presets as main computed them before the per-option schemas
# (commit 0d00d66): a run dir's checkpoints and a sweep's completed jobs are found by these.
PRESET_HASHES = {
    (): "92fc47072027c9c8",  # the CPU demo, backend=single
    ("experiment=vicuna-7b",): "99640eb3d9ea0387",
    ("experiment=vicuna-13b",): "b105db9825d4b07a",
    ("backend=ddp",): "7b0fcd63a1a2517f",
    ("backend=deepspeed_zero2",): "c7463b9553162778",
    ("backend=deepspeed_zero3",): "c68d04c04ecfc5f8",
    ("backend=deepspeed_zero3_offload",): "490361276ea4e4fb",
    ("backend=fsdp",): "1e36084f00bb8a83",
    ("backend=fsdp_offload",): "50f4d80653699dd1",
    ("backend=single",): "92fc47072027c9c8",
    ("experiment=vicuna-7b", "model.path=/weights"): "da476970db3d5831",
    ("experiment=vicuna-13b", "backend=fsdp_offload"): "97ba64bf45445c4d",
    ("data=sharegpt",): "6f3f3da2b457a16b",
    ("logger=none",): "92fc47072027c9c8",
}


@pytest.mark.parametrize("overrides", list(PRESET_HASHES), ids=lambda o: " ".join(o) or "default")
def test_preset_hashes_are_those_of_earlier_runs(overrides: tuple[str, ...]) -> None:
    assert config_hash(compose(list(overrides))) == PRESET_HASHES[overrides]


def test_every_backend_option_on_the_default_has_a_pinned_hash() -> None:
    assert {f"backend={o}" for o in _options("backend")} <= {o[0] for o in PRESET_HASHES if len(o) == 1}


def test_a_later_key_at_its_neutral_value_stays_out_of_the_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = OmegaConf.create(OmegaConf.to_container(compose([])))  # untyped, so a key can be added
    before = config_hash(cfg)
    cfg.trainer.new_feature = None  # a key added after the hashes were written, off
    assert config_hash(cfg) != before  # unregistered: it enters the hash
    monkeypatch.setitem(HASH_NEUTRAL, "trainer.new_feature", None)
    assert config_hash(cfg) == before
    cfg.trainer.new_feature = 3  # switched on: a different model, a different hash
    assert config_hash(cfg) != before


def test_a_backend_hashes_its_own_keys() -> None:
    assert config_hash(compose(["backend=ddp", "backend.bucket_size_mb=50"])) != PRESET_HASHES[("backend=ddp",)]
    assert "zero_stage" not in compose(["backend=fsdp"]).backend


@pytest.mark.parametrize("command", ["train", "plan", "prepare"])
@pytest.mark.parametrize("override,key,valid", [
    ("backend.zero_stage=2", "backend.zero_stage", "name, bucket_size_mb"),
    ("backend.sharding=hybrid", "backend.sharding", "name, bucket_size_mb"),
])
def test_a_key_of_another_backend_fails_at_composition(command: str, override: str, key: str, valid: str,
                                                       capsys: pytest.CaptureFixture) -> None:
    assert main([command, "backend=ddp", override]) == 2
    err = capsys.readouterr().err.strip()
    assert f"unknown key '{key}'" in err and f"backend.name=ddp: {valid}" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("argv", [
    ["train", "backend=fsdp", "backend.offload_optimizer=true", "--cfg", "job"],
    ["train", "-m", "backend=fsdp,deepspeed_zero3", "backend.offload_optimizer=true"],
    ["plan", "-m", "backend=fsdp,deepspeed_zero3", "backend.offload_optimizer=true"],
    ["sweep", "backend", "backend.offload_optimizer=true"],
])
def test_a_key_of_another_backend_stops_every_entry_point(argv: list[str], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    code = main([*argv, f"hydra.sweep.dir={tmp_path}"] if "-m" in argv or argv[0] == "sweep" else argv)
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown key 'backend.offload_optimizer'" in err and "sharding, reshard_after_forward, cpu_offload" in err
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # no job started


def test_logger_none_has_no_wandb_keys(capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "logger=none", "logger.mode=offline"]) == 2
    assert "valid keys of 'logger' for logger.name=none: name, group" in capsys.readouterr().err
    assert compose(["logger=none", "logger.group=g"]).logger.group == "g"  # sweeps set it whatever the logger


@pytest.mark.parametrize("override,valid", [
    ("trainer.precision=fp64", "[auto, fp32, bf16_mixed, bf16]"),
    ("optim.schedule=step", "[cosine, linear, constant]"),
    ("backend=fsdp backend.sharding=ring", "[full, hybrid]"),
    ("data.overflow=wrap", "[split, truncate, drop]"),
    ("trainer.device=tpu", "[auto, cpu, cuda]"),
    ("trainer.export_dtype=int8", "[bf16, fp16, fp32]"),
    ("logger.mode=sometimes", "[auto, online, offline, disabled]"),
    ("model.init=zeros", "[pretrained, random]"),
    ("launcher.dist_backend=mpi", "[auto, nccl, gloo]"),
    ("model.attn_implementation=flash", "[auto, sdpa, eager, flash_attention_2, varlen, flex_attention]"),
])
def test_a_value_outside_its_enum_exits_2_listing_the_valid_values(override: str, valid: str,
                                                                   capsys: pytest.CaptureFixture) -> None:
    *rest, last = override.split()
    assert main(["train", *rest, last]) == 2
    err = capsys.readouterr().err.strip()
    assert last.partition("=")[0] in err and valid in err and len(err.splitlines()) == 1


def test_an_option_that_leaves_a_key_missing_is_named(capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "model.hidden_size=???"]) == 2
    assert "no value for model.hidden_size" in capsys.readouterr().err


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS if g != "experiment" for o in _options(g)])
def test_each_default_has_one_place(group: str, option: str) -> None:
    """A key an option's YAML sets has no default in the schema (it is MISSING there)."""
    cfg = compose([f"{group}={option}"])
    schema = OmegaConf.get_type(cfg, group)
    assert dataclasses.is_dataclass(schema), schema
    defaults = {f.name: f for f in dataclasses.fields(schema)}
    raw = yaml.safe_load((conf_dir() / group / f"{option}.yaml").read_text()) or {}
    for key in set(raw) - {"defaults"}:
        f = defaults[key]
        assert f.default == MISSING and f.default_factory is dataclasses.MISSING, f"{group}.{key}: also defaulted in {schema.__name__}"


def test_vicuna_13b_is_vicuna_7b_on_the_13b_model() -> None:
    seven = OmegaConf.to_container(compose(["experiment=vicuna-7b"]), resolve=True)
    thirteen = OmegaConf.to_container(compose(["experiment=vicuna-13b"]), resolve=True)
    assert thirteen["model"]["name"] == "llama-13b" and thirteen["experiment"] == "vicuna-13b"
    for c in (seven, thirteen):
        c.pop("model"), c.pop("experiment")
    assert thirteen == seven


def test_a_run_dir_written_before_the_option_schemas_still_reads(tmp_path: Path) -> None:
    """Its resolved config carries every backend's keys; the ones ddp never read are dropped."""
    old = OmegaConf.to_container(compose(["backend=ddp", "logger=none"]), resolve=True, enum_to_str=True)
    old["backend"].update(sharding="full", zero_stage=3, offload_params=False)
    old["logger"].update(project="vicuna-exp", mode="auto")
    cfg = typed_config(old)
    assert OmegaConf.get_type(cfg, "backend") is DdpBackendConfig and "zero_stage" not in cfg.backend
    assert config_hash(cfg) == PRESET_HASHES[("backend=ddp",)]
    old["backend"]["bucket_cap"] = 1  # never a key of any backend: still an error
    with pytest.raises(Exception, match="bucket_cap"):
        typed_config(old)


def test_reduce_every_micro_batch_is_hash_neutral_at_its_memory_safe_default(tmp_path: Path) -> None:
    """The fsdp pins above hold with the key at true; false is another job. A run dir written
    before the key existed reads it at true, and hashes as it always did."""
    assert compose(["backend=fsdp"]).backend.reduce_every_micro_batch is True
    off = compose(["backend=fsdp", "backend.reduce_every_micro_batch=false"])
    assert config_hash(off) != PRESET_HASHES[("backend=fsdp",)]
    old = OmegaConf.to_container(compose(["backend=fsdp"]), resolve=True, enum_to_str=True)
    del old["backend"]["reduce_every_micro_batch"]
    cfg = typed_config(old)
    assert cfg.backend.reduce_every_micro_batch is True
    assert config_hash(cfg) == PRESET_HASHES[("backend=fsdp",)]


def test_a_hybrid_mesh_needs_whole_nodes() -> None:
    """The rule the pre-launch check (`validate`) and the FSDP worker share: the worker's world
    and node size come from torchrun, the job's from launcher.nproc_per_node x launcher.nnodes."""
    from vicuna_exp.choices import Sharding
    from vicuna_exp.mesh import mesh_shape

    assert mesh_shape(Sharding.full, 6, 4) == (6,)
    assert mesh_shape(Sharding.hybrid, 8, 4) == (2, 4)
    with pytest.raises(UsageError) as e:
        mesh_shape(Sharding.hybrid, 6, 4)
    msg = str(e.value)
    assert msg.startswith("backend.sharding=hybrid: the world size 6 is not a multiple of the node size 4")
    assert "launcher.nproc_per_node" in msg and "launcher.nnodes" in msg
    validate(compose(["backend=fsdp", "backend.sharding=hybrid", "launcher.nproc_per_node=4", "launcher.nnodes=2",
                      "trainer.global_batch_size=8"]))


def test_a_section_is_checked_never_trimmed() -> None:
    """prepare() takes the schema's object; a key the schema lacks is an error, not dropped."""
    data = dict(OmegaConf.to_container(compose([]).data), dedupe=False)
    with pytest.raises(UsageError, match="data.dedupe"):
        as_schema(data, DataConfig, "data")
    assert as_schema(compose([]).data, DataConfig, "data") == load_option("data", "sample")


def test_config_hash_ignores_how_faults_are_watched() -> None:
    """Stall, collective and tracker timeouts change nothing trained: a rerun with other limits resumes."""
    a = compose([])
    b = compose(["launcher.stall_timeout_s=5", "launcher.stall_timeout_by_phase_s.setup=60",
                 "launcher.collective_timeout_s=30", "logger.init_timeout_s=3"])
    assert config_hash(a) == config_hash(b)
