"""The configuration schema: what every key means, its type and its default.

Hydra composes `conf/` on top of this schema in struct mode, so an unknown key, a wrong type
or an unknown group option fails at composition time, before anything heavy is imported.
Value checks that need arithmetic (`validate`) run inside each job, so in a multirun a bad
value fails only its own job. Defaults reproduce the published Vicuna recipe where one exists;
the CPU demo scales them down in `conf/experiment/demo.yaml`.

Section schemas owned by a component live next to it (data, eval, plan) and are imported here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vicuna_exp import batch_split
from vicuna_exp.data.config import DataConfig, TemplateConfig
from vicuna_exp.errors import UsageError, require_resolvable
from vicuna_exp.eval.config import EvalConfig
from vicuna_exp.plan.config import HardwareConfig, PlanConfig, SkyConfig


class AttnImpl(str, Enum):
    auto = "auto"  # flash_attention_2 when importable on CUDA, else sdpa
    sdpa = "sdpa"
    eager = "eager"
    flash_attention_2 = "flash_attention_2"


class Precision(str, Enum):
    auto = "auto"  # bf16_mixed on a bf16-capable GPU, fp32 elsewhere
    fp32 = "fp32"  # fp32 weights, optimizer state and compute
    bf16_mixed = "bf16_mixed"  # fp32 master weights and optimizer state, bf16 compute
    bf16 = "bf16"  # bf16 weights and compute (optimizer state follows the weights)


@dataclass
class ModelConfig:
    """Architecture facts are plain values so the planner can reason about models it never loads."""

    name: str = "tiny"
    init: str = "pretrained"  # pretrained (weights from model.path) | random (from the facts below)
    path: str | None = None  # local Hugging Face model dir; required when init=pretrained
    tokenizer: str | None = None  # tokenizer dir; default: model.path, or the packaged tiny tokenizer
    vocab_size: int | None = None  # None: taken from the tokenizer
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    attn_implementation: AttnImpl = AttnImpl.auto
    gradient_checkpointing: bool = True  # Vicuna trains with it on


@dataclass
class ContextConfig:
    length: int = 2048  # Vicuna: 2048; Alpaca: 512


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay: FastChat's train_mem.py settings."""

    name: str = "adamw"
    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_ratio: float = 0.03
    warmup_steps: int | None = None  # overrides warmup_ratio when set
    schedule: str = "cosine"  # cosine | linear | constant
    min_lr_ratio: float = 0.0  # floor of the decay, as a fraction of lr
    fused: bool = False  # torch's fused AdamW kernel (CUDA only)


@dataclass
class TrainerConfig:
    """Batch sizes count sequences (rows); accumulation is derived from them and the world size."""

    micro_batch_size: int = 2  # the most rows one forward takes on one rank (a memory cap, not a divisor)
    global_batch_size: int = 128  # rows per optimizer step over all ranks (Vicuna: 128)
    tokens_per_step: int | None = None  # if set, global_batch_size = tokens_per_step / context.length
    epochs: float = 3.0
    max_steps: int | None = None  # stop after this many optimizer steps (None: run all epochs)
    # Token slots (rows x context) to train on, replacing `epochs`: arms of a sweep that hold
    # tokens_per_step fixed then take the same number of steps on the same budget.
    token_budget: int | None = None
    max_minutes: float | None = None  # end cleanly as interrupted (exit 75) after this long
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    precision: Precision = Precision.auto
    seed: int = 42
    eval_every_steps: int | None = None  # plus once at the end
    eval_max_rows: int | None = None  # cap on eval rows per evaluation (None: the whole split)
    save_every_steps: int | None = None
    save_every_minutes: float | None = 30.0
    keep_last: int = 2
    resume: str = "auto"  # auto (latest complete checkpoint in the run dir) | never | PATH
    preempt_grace_s: float = 30.0
    log_every_steps: int = 1
    device: str = "auto"  # auto | cpu | cuda
    export_dtype: str = "bf16"  # dtype of final/ (bf16 | fp16 | fp32)
    export_shard_mb: int = 5120  # largest safetensors file of final/; the writing rank buffers at most this
    save_final: bool = True
    loss_spike_guard: bool = True  # a non-finite loss stops the run before the optimizer step


@dataclass
class BackendConfig:
    """How parameters, gradients and optimizer state are placed across ranks."""

    name: str = "single"  # single | ddp | fsdp | deepspeed
    sharding: str = "full"  # fsdp: full | hybrid (shard within a node, replicate across nodes)
    reshard_after_forward: bool = True  # fsdp: free gathered params after forward (ZeRO-3 style)
    cpu_offload: bool = False  # fsdp: parameters and optimizer state on the CPU
    zero_stage: int = 3  # deepspeed: 2 or 3
    offload_optimizer: bool = False  # deepspeed: optimizer state on the CPU (needs the cpu_adam op)
    offload_params: bool = False  # deepspeed ZeRO-3: parameters on the CPU
    overlap_comm: bool = True
    bucket_size_mb: int = 200


@dataclass
class LauncherConfig:
    """One process per device; several nodes rendezvous through `rdzv_endpoint`."""

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None  # host:port of node 0 when nnodes > 1
    rdzv_id: str | None = None
    dist_backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    max_restarts: int = 0
    monitor_interval_s: float = 1.0


@dataclass
class LoggerConfig:
    name: str = "wandb"  # wandb | none
    project: str = "vicuna-exp"
    entity: str | None = None
    group: str | None = None  # sweeps set it to the sweep name
    mode: str = "auto"  # auto (online when an API key is configured, else offline) | online | offline | disabled
    tags: list[str] = field(default_factory=list)
    job_type: str = "train"


@dataclass
class VicunaConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    context: ContextConfig = field(default_factory=ContextConfig)
    data: DataConfig = field(default_factory=DataConfig)
    template: TemplateConfig = field(default_factory=TemplateConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sky: SkyConfig = field(default_factory=SkyConfig)
    experiment: str | None = None  # name of the experiment preset, for the record


SCHEMA_NAME = "vicuna_schema"
JOB_DIRNAME_RESOLVER = "vicuna_exp_job_dirname"


def job_dirname(override_dirname: str) -> str:
    """A multirun job's dir from Hydra's `override_dirname`, minus the quotes numeric group options
    need (`context='512'` -> `context=512`) and with no `/` (a value must not nest dirs)."""
    name = override_dirname.replace("'", "").replace('"', "").replace("/", "_")
    return name or "default"


# At import, so Hydra finds it inside jobs that run in other processes (joblib, submitit).
OmegaConf.register_new_resolver(JOB_DIRNAME_RESOLVER, job_dirname, replace=True)


# Maps whose keys are the user's own (paths, variable names): open to new keys under struct mode, so
# `sky.file_mounts={/models:s3://weights}` adds an entry instead of failing as an unknown key.
FREE_FORM_MAPS = ("sky.envs", "sky.file_mounts")


def register_configs() -> None:
    """Put the schema into Hydra's ConfigStore; `conf/config.yaml` lists it first in its defaults."""
    from hydra.core.config_store import ConfigStore

    node = OmegaConf.structured(VicunaConfig)
    for key in FREE_FORM_MAPS:
        OmegaConf.set_struct(OmegaConf.select(node, key), False)
    ConfigStore.instance().store(name=SCHEMA_NAME, node=node)


def conf_dir() -> Path:
    """The `conf/` tree: beside the package in a checkout (editable install), or shipped inside it."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "conf", here / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise UsageError(f"config tree not found next to {here}: expected conf/config.yaml")


# Keys that do not change what is trained: excluded from the config hash, so a rerun that only
# changes where metrics go, or how it resumes, is still recognised as the same job.
_HASH_EXCLUDED = ("logger", "trainer.resume", "launcher.rdzv_endpoint", "launcher.rdzv_id",
                  "launcher.node_rank", "launcher.monitor_interval_s", "eval", "plan", "hardware", "sky")


def config_hash(cfg: DictConfig) -> str:
    """A short content hash of everything that determines the trained model."""
    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert isinstance(container, dict)
    container.pop("hydra", None)
    for dotted in _HASH_EXCLUDED:
        node: Any = container
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    blob = json.dumps(container, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def world_size(cfg: DictConfig) -> int:
    return int(cfg.launcher.nproc_per_node) * int(cfg.launcher.nnodes)


def global_batch_size(cfg: DictConfig) -> int:
    """Rows per optimizer step: explicit, or derived from a fixed token budget per step."""
    if cfg.trainer.tokens_per_step is not None:
        return int(cfg.trainer.tokens_per_step) // int(cfg.context.length)
    return int(cfg.trainer.global_batch_size)


def rows_per_rank(cfg: DictConfig) -> int:
    """Rows each rank trains on per optimizer step (the global batch split evenly over ranks)."""
    return global_batch_size(cfg) // world_size(cfg)


def micro_batch_sizes(cfg: DictConfig) -> list[int]:
    """How one rank's rows of a step are cut under the `trainer.micro_batch_size` cap."""
    return batch_split.micro_batch_sizes(rows_per_rank(cfg), int(cfg.trainer.micro_batch_size))


def grad_accumulation_steps(cfg: DictConfig) -> int:
    """Micro-batches per rank per optimizer step."""
    return len(micro_batch_sizes(cfg))


def validate(cfg: DictConfig) -> None:
    """Checks that need values, not just types. Raises UsageError naming the key."""

    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise UsageError(f"{key}: {msg}")

    require_resolvable(cfg)
    t, o = cfg.trainer, cfg.optim
    need(cfg.context.length > 0, "context.length", f"must be a positive number of tokens, got {cfg.context.length}")
    need(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    need(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    need(0 <= o.warmup_ratio < 1, "optim.warmup_ratio", f"must be in [0, 1), got {o.warmup_ratio}")
    need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", f"must be two values in [0, 1), got {list(o.betas)}")
    need(o.schedule in ("cosine", "linear", "constant"), "optim.schedule", f"must be cosine, linear or constant, got {o.schedule!r}")
    need(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    need(o.name == "adamw", "optim.name", f"only 'adamw' is implemented, got {o.name!r}")
    need(t.micro_batch_size > 0, "trainer.micro_batch_size", f"must be > 0, got {t.micro_batch_size}")
    if t.tokens_per_step is not None:
        need(t.tokens_per_step > 0, "trainer.tokens_per_step", f"must be > 0, got {t.tokens_per_step}")
        need(t.tokens_per_step % cfg.context.length == 0, "trainer.tokens_per_step",
             f"{t.tokens_per_step} is not a multiple of context.length={cfg.context.length}")
    gbs = global_batch_size(cfg)
    need(gbs > 0, "trainer.global_batch_size", f"must be > 0, got {gbs}")
    ws = world_size(cfg)
    need(cfg.launcher.nproc_per_node > 0 and cfg.launcher.nnodes > 0, "launcher.nproc_per_node",
         "nproc_per_node and nnodes must be > 0")
    source = "trainer.tokens_per_step" if t.tokens_per_step is not None else "trainer.global_batch_size"
    split = batch_split.split_error(gbs, int(cfg.launcher.nproc_per_node), int(cfg.launcher.nnodes), source=source)
    if split:
        raise UsageError(split)
    need(t.epochs > 0, "trainer.epochs", f"must be > 0, got {t.epochs}")
    need(t.max_steps is None or t.max_steps > 0, "trainer.max_steps", f"must be > 0 or null, got {t.max_steps}")
    need(t.token_budget is None or t.token_budget >= gbs * cfg.context.length, "trainer.token_budget",
         f"{t.token_budget} is less than one step ({gbs} rows x {cfg.context.length} tokens)")
    need(t.max_minutes is None or t.max_minutes > 0, "trainer.max_minutes", f"must be > 0 or null, got {t.max_minutes}")
    need(t.grad_clip >= 0, "trainer.grad_clip", f"must be >= 0 (0 disables), got {t.grad_clip}")
    need(t.keep_last >= 1, "trainer.keep_last", f"must be >= 1, got {t.keep_last}")
    need(t.log_every_steps >= 1, "trainer.log_every_steps", f"must be >= 1, got {t.log_every_steps}")
    for key in ("eval_every_steps", "save_every_steps"):
        v = t[key]
        need(v is None or v > 0, f"trainer.{key}", f"must be > 0 or null, got {v}")
    need(t.device in ("auto", "cpu", "cuda"), "trainer.device", f"must be auto, cpu or cuda, got {t.device!r}")
    need(t.export_dtype in ("bf16", "fp16", "fp32"), "trainer.export_dtype", f"must be bf16, fp16 or fp32, got {t.export_dtype!r}")
    need(cfg.logger.name in ("wandb", "none"), "logger.name", f"must be wandb or none, got {cfg.logger.name!r}")
    need(cfg.logger.mode in ("auto", "online", "offline", "disabled"), "logger.mode",
         f"must be auto, online, offline or disabled, got {cfg.logger.mode!r}")
    need(cfg.backend.name in ("single", "ddp", "fsdp", "deepspeed"), "backend.name",
         f"must be single, ddp, fsdp or deepspeed, got {cfg.backend.name!r}")
    need(not (cfg.backend.name == "single" and ws > 1), "backend",
         f"backend=single runs one process, but launcher asks for {ws}; choose backend=ddp, fsdp or deepspeed_zero3")
    m = cfg.model
    need(m.init in ("pretrained", "random"), "model.init", f"must be pretrained or random, got {m.init!r}")
    if m.init == "pretrained":
        need(m.path is not None, "model.path",
             f"model '{m.name}' loads pretrained weights: set model.path=/path/to/local/{m.name}-hf")
    else:
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
                   if m[k] is None]
        need(not missing, "model", f"a random-init model needs {', '.join('model.' + k for k in missing)}")
    if m.hidden_size is not None and m.num_attention_heads is not None:
        need(m.hidden_size % m.num_attention_heads == 0, "model.hidden_size",
             f"{m.hidden_size} is not divisible by num_attention_heads={m.num_attention_heads}")
    need(cfg.context.length <= m.max_position_embeddings or m.path is not None, "context.length",
         f"{cfg.context.length} exceeds model.max_position_embeddings={m.max_position_embeddings}")
