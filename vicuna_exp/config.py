"""The configuration schema: what every key means and its type.

Hydra composes `conf/` on top of this schema in struct mode, so an unknown key, a wrong type, a
value outside its Enum (`vicuna_exp.choices`) or an unknown group option fails at composition,
before anything heavy is imported. Value checks that need arithmetic across keys (`validate`) run
inside each job, so in a multirun a bad value fails only its own job.

Each default lives in one place. A section chosen by a config group (`model=`, `backend=`, ...)
takes its values from the option's YAML, so here its keys are `MISSING`; only keys no option
sets have a default here. Sections with no group (`trainer`, `plan`, `eval`, `sky`) are defined
here with their defaults. Options of one group that carry different keys (the backends, the
loggers) each have their own schema, stored in the group and named first in the option's
defaults list, so a key of another option is an error at composition.

Section schemas owned by a component live next to it (data, eval, plan) and are imported here.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import MISSING, DictConfig, OmegaConf

from vicuna_exp import batch_split
from vicuna_exp.choices import (
    AttnImpl,
    BackendName,
    ComputeDtype,
    Device,
    DistBackend,
    ExportDtype,
    FinetuneMethod,
    LoggerMode,
    LoggerName,
    ModelInit,
    OptimizerName,
    Precision,
    QuantType,
    Schedule,
    Sharding,
)
from vicuna_exp.data.config import DataConfig, TemplateConfig
from vicuna_exp.errors import UsageError, require_resolvable
from vicuna_exp.eval.config import EvalConfig
from vicuna_exp.mesh import mesh_shape
from vicuna_exp.plan.config import HardwareConfig, PlanConfig, SkyConfig


@dataclass
class ModelConfig:
    """Architecture facts are plain values so the planner can reason about models it never loads."""

    name: str = MISSING
    init: ModelInit = MISSING  # pretrained (weights from model.path) | random (from the facts below)
    path: str | None = MISSING  # local Hugging Face model dir; required when init=pretrained
    tokenizer: str | None = MISSING  # tokenizer dir, or vocabulary:NAME; null: model.path, or the packaged tiny one
    vocab_size: int | None = MISSING  # None: taken from the tokenizer
    hidden_size: int | None = MISSING
    intermediate_size: int | None = MISSING
    num_hidden_layers: int | None = MISSING
    num_attention_heads: int | None = MISSING
    num_key_value_heads: int | None = MISSING
    max_position_embeddings: int = MISSING
    rms_norm_eps: float = MISSING
    rope_theta: float = MISSING
    tie_word_embeddings: bool = MISSING
    # The transformers config class of a random-init model (a pretrained one's is in its config.json).
    # Added after the LLaMA-only options; at their LLaMA values they stay out of the hash (HASH_NEUTRAL).
    architecture: str = MISSING  # LlamaConfig | MistralConfig | Qwen2Config | any causal LM's config class
    rope_scaling: dict[str, Any] | None = MISSING  # Llama-3.1: {rope_type: llama3, factor: 8.0, ...}
    sliding_window: int | None = MISSING  # Mistral v0.1: 4096 (attention sees only the last N tokens)
    initializer_range: float = 0.02
    attn_implementation: AttnImpl = AttnImpl.auto
    gradient_checkpointing: bool = MISSING  # Vicuna trains with it on


@dataclass
class ContextConfig:
    length: int = MISSING  # Vicuna: 2048; Alpaca: 512


@dataclass
class OptimConfig:
    """AdamW with linear warmup and a decay schedule; `conf/optim/adamw.yaml` holds FastChat's settings."""

    name: OptimizerName = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    betas: list[float] = MISSING
    eps: float = MISSING
    warmup_ratio: float = MISSING
    warmup_steps: int | None = MISSING  # overrides warmup_ratio when set
    schedule: Schedule = MISSING
    min_lr_ratio: float = MISSING  # floor of the decay, as a fraction of lr
    fused: bool = MISSING  # torch's fused AdamW kernel (CUDA only)
    # A preset's learning rate for a method other than full (`demo` sets LoRA's on the tiny model),
    # used in place of that method's `finetune.lr`; `lr` itself is the full-fine-tuning value.
    lr_by_method: dict[str, float] = field(default_factory=dict)
    # Where `lr` came from, written when the config is composed (`with_lr_in_force`); a record, not a knob.
    lr_source: str | None = None


@dataclass
class FinetuneConfig:
    """Which parameters train: the keys every method has. Each method's own schema extends it
    (`FINETUNE_SCHEMAS`)."""

    name: FinetuneMethod = MISSING
    # The method's learning rate, used unless `optim.lr` is set on the command line (or a preset
    # names one in `optim.lr_by_method`); null: the method trains at `optim.lr` (full).
    lr: float | None = MISSING


@dataclass
class FullFinetuneConfig(FinetuneConfig):
    """Every parameter trains, at `optim.lr`."""


@dataclass
class LoraFinetuneConfig(FinetuneConfig):
    """Low-rank adapters (peft's LoraConfig) on a frozen base; keys named as peft names them."""

    r: int = MISSING  # adapter rank
    lora_alpha: float = MISSING  # the update is scaled by lora_alpha / r (rsLoRA: lora_alpha / sqrt(r))
    lora_dropout: float = MISSING
    # Module names (suffixes) to adapt; `all-linear` is every linear layer of the decoder blocks in
    # any family (peft's name for it), never the LM head.
    target_modules: list[str] = MISSING
    train_embeddings: bool = MISSING  # the input embeddings train in full beside the adapters
    train_lm_head: bool = MISSING  # the LM head trains in full beside the adapters
    use_dora: bool = MISSING  # weight-decomposed LoRA (DoRA)
    use_rslora: bool = MISSING  # rank-stabilised scaling, lora_alpha / sqrt(r)


@dataclass
class QloraFinetuneConfig(LoraFinetuneConfig):
    """LoRA's adapters over a base frozen in bitsandbytes 4-bit; the quantisation keys are named as
    transformers' BitsAndBytesConfig names them."""

    bnb_4bit_quant_type: QuantType = MISSING
    bnb_4bit_use_double_quant: bool = MISSING  # the absmax constants quantised to 8 bits as well
    bnb_4bit_compute_dtype: ComputeDtype = MISSING  # the matmuls' dtype (bf16: fp32 on a CPU without bf16)


FINETUNE_SCHEMAS: dict[FinetuneMethod, type[FinetuneConfig]] = {
    FinetuneMethod.full: FullFinetuneConfig,
    FinetuneMethod.lora: LoraFinetuneConfig,
    FinetuneMethod.qlora: QloraFinetuneConfig,
}
# The methods that train peft's LoRA adapters (their keys: `LoraFinetuneConfig`).
LORA_METHODS = (FinetuneMethod.lora, FinetuneMethod.qlora)


@dataclass
class TrainerConfig:
    """Batch sizes count sequences (rows); accumulation is derived from them and the world size."""

    micro_batch_size: int = 2  # the most rows one forward takes on one rank (a memory cap, not a divisor)
    global_batch_size: int = 128  # rows per optimizer step over all ranks (Vicuna: 128)
    tokens_per_step: int | None = None  # if set, global_batch_size = tokens_per_step / context.length
    # Text per optimizer step, in UTF-8 bytes of conversation: each run derives its tokens_per_step
    # from the bytes per token measured on its own prepared train split (`text_budget.tokens_for_bytes`),
    # so bases with different tokenizers step over the same amount of text. Null: not used.
    bytes_per_step: int | None = None
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
    # auto (latest complete checkpoint in the run dir) | never | PATH: a string, since a path is
    # allowed; the named values are `choices.ResumeMode`.
    resume: str = "auto"
    preempt_grace_s: float = 30.0
    log_every_steps: int = 1
    device: Device = Device.auto
    export_dtype: ExportDtype = ExportDtype.bf16  # dtype of final/
    export_shard_mb: int = 5120  # largest safetensors file of final/; the writing rank buffers at most this
    save_final: bool = True
    loss_spike_guard: bool = True  # a non-finite loss stops the run before the optimizer step
    # The loss projects hidden states through the LM head at supervised positions only, this many
    # at a time (fp32 log-softmax per chunk, recomputed in backward); 0: logits at every position.
    loss_chunk_tokens: int = 512


@dataclass
class BackendConfig:
    """How parameters, gradients and optimizer state are placed across ranks: the keys every
    backend has. Each backend's own schema extends it (`BACKEND_SCHEMAS`)."""

    name: BackendName = MISSING


@dataclass
class SingleBackendConfig(BackendConfig):
    """One process, one device."""


@dataclass
class DdpBackendConfig(BackendConfig):
    bucket_size_mb: int = MISSING  # DDP's gradient all-reduce buckets


@dataclass
class FsdpBackendConfig(BackendConfig):
    sharding: Sharding = MISSING  # full | hybrid (shard within a node, replicate across nodes)
    reshard_after_forward: bool = MISSING  # free gathered params after forward (ZeRO-3 style)
    cpu_offload: bool = MISSING  # parameters, gradients and optimizer state on the CPU
    # true: reduce-scatter every micro-batch into the sharded gradients (memory-safe); false: once
    # per step, holding every parameter's unsharded gradient between micro-batches (less traffic)
    reduce_every_micro_batch: bool = MISSING


@dataclass
class DeepSpeedBackendConfig(BackendConfig):
    zero_stage: int = MISSING  # 2 or 3
    offload_optimizer: bool = MISSING  # optimizer state on the CPU (needs the cpu_adam op)
    offload_params: bool = MISSING  # ZeRO-3: parameters on the CPU
    overlap_comm: bool = MISSING
    bucket_size_mb: int = MISSING


BACKEND_SCHEMAS: dict[BackendName, type[BackendConfig]] = {
    BackendName.single: SingleBackendConfig,
    BackendName.ddp: DdpBackendConfig,
    BackendName.fsdp: FsdpBackendConfig,
    BackendName.deepspeed: DeepSpeedBackendConfig,
}


@dataclass
class LauncherConfig:
    """One process per device; several nodes rendezvous through `rdzv_endpoint`."""

    nproc_per_node: int = MISSING
    nnodes: int = MISSING
    node_rank: int = MISSING
    rdzv_endpoint: str | None = MISSING  # host:port of node 0 when nnodes > 1
    rdzv_id: str | None = None
    dist_backend: DistBackend = DistBackend.auto  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    max_restarts: int = 0
    monitor_interval_s: float = 1.0
    # A rank silent this long has stalled: the job kills every worker (exit 1). Long enough for the
    # silent stretches that are not hangs: evaluation, a checkpoint save, the DeepSpeed op build.
    stall_timeout_s: float = 1800.0
    # Phases with longer silent stretches: data preparation (on a cold cache), weight loading.
    stall_timeout_by_phase_s: dict[str, float] = field(
        default_factory=lambda: {"prepare_data": 14400.0, "setup": 3600.0, "export": 3600.0})
    collective_timeout_s: float = 3600.0  # the process group's own timeout, the second line of defence


@dataclass
class LoggerConfig:
    """Where metrics go besides metrics.jsonl: the keys every logger has (`logger=none`)."""

    name: LoggerName = MISSING
    group: str | None = None  # sweeps set it to the sweep name, whatever the logger


@dataclass
class WandbLoggerConfig(LoggerConfig):
    project: str = MISSING
    entity: str | None = None
    mode: LoggerMode = MISSING  # auto (online when an API key is configured, else offline) | online | offline | disabled
    tags: list[str] = field(default_factory=list)
    job_type: str = "train"
    init_timeout_s: float = 60.0  # bound on wandb's init and finish; an unreachable server means offline


LOGGER_SCHEMAS: dict[LoggerName, type[LoggerConfig]] = {
    LoggerName.wandb: WandbLoggerConfig,
    LoggerName.none: LoggerConfig,
}

# Groups whose options carry different keys: the section's schema per option, by its `name`.
OPTION_SCHEMAS: dict[str, dict[Any, type]] = {"backend": BACKEND_SCHEMAS, "logger": LOGGER_SCHEMAS,
                                              "finetune": FINETUNE_SCHEMAS}

# A section a run dir written before its group existed lacks: the option that reproduces those runs.
SECTION_BEFORE_GROUP: dict[str, dict[str, Any]] = {"finetune": {"name": "full", "lr": None}}


@dataclass
class VicunaConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    context: ContextConfig = field(default_factory=ContextConfig)
    data: DataConfig = field(default_factory=DataConfig)
    template: TemplateConfig = field(default_factory=TemplateConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    backend: BackendConfig = MISSING  # one of BACKEND_SCHEMAS, from the option's defaults list
    finetune: FinetuneConfig = MISSING  # one of FINETUNE_SCHEMAS, from the option's defaults list
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    logger: LoggerConfig = MISSING  # one of LOGGER_SCHEMAS, from the option's defaults list
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sky: SkyConfig = field(default_factory=SkyConfig)
    experiment: str | None = None  # name of the experiment preset, for the record


T = TypeVar("T")

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


def schema_option(name: Any) -> str:
    """The ConfigStore name of an option schema in its group (`backend/ddp_schema`): what an
    option's YAML names first in its defaults list."""
    return f"{name}_schema"


def register_configs() -> None:
    """Put the schemas into Hydra's ConfigStore: the root one, which `conf/config.yaml` lists first
    in its defaults, and one per option of the groups whose options carry different keys."""
    from hydra.core.config_store import ConfigStore

    node = OmegaConf.structured(VicunaConfig)
    for key in FREE_FORM_MAPS:
        OmegaConf.set_struct(OmegaConf.select(node, key), False)
    store = ConfigStore.instance()
    store.store(name=SCHEMA_NAME, node=node)
    for group, schemas in OPTION_SCHEMAS.items():
        for name, schema in schemas.items():
            store.store(group=group, name=schema_option(name), node=schema)


def typed_config(resolved: Any) -> DictConfig:
    """A resolved config (a run dir's `resolved_config.yaml`) typed by the schema again, each
    option's section by its own schema. Keys of the first, shared layout (`V1_LAYOUT`) that the
    option's schema lacks are dropped: run dirs written before the per-option schemas carry them,
    and nothing ever read them for that option."""
    raw = OmegaConf.to_container(OmegaConf.create(resolved), resolve=False)
    assert isinstance(raw, dict)
    cfg = OmegaConf.structured(VicunaConfig)
    for section, schemas in OPTION_SCHEMAS.items():
        node = raw.pop(section, SECTION_BEFORE_GROUP.get(section))
        if not isinstance(node, dict):
            raise UsageError(f"{section}: missing from the resolved config")
        schema = schemas.get(node.get("name"))
        if schema is None:
            raise UsageError(f"{section}.name={node.get('name')!r}: choose one of {', '.join(map(str, schemas))}")
        own = {f.name for f in dataclasses.fields(schema)}
        legacy = V1_LAYOUT.get(section, {})
        cfg[section] = OmegaConf.merge(OmegaConf.structured(schema),
                                       {k: v for k, v in node.items() if k in own or k not in legacy})
    merged = OmegaConf.merge(cfg, raw)
    assert isinstance(merged, DictConfig)
    _fill_later_keys(merged)
    return merged


def _fill_later_keys(cfg: DictConfig) -> None:
    """A run dir written before a key existed reads it at its neutral value (`HASH_NEUTRAL`), the
    value its hash was computed without."""
    for dotted, neutral in HASH_NEUTRAL.items():
        parent, _, leaf = dotted.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if isinstance(node, DictConfig) and leaf in node.keys() and OmegaConf.is_missing(node, leaf):
            node[leaf] = neutral


def conf_dir() -> Path:
    """The `conf/` tree: beside the package in a checkout (editable install), or shipped inside it."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "conf", here / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise UsageError(f"config tree not found next to {here}: expected conf/config.yaml")


@functools.cache
def _structured(schema: type) -> DictConfig:
    """The schema as a typed node, built once: OmegaConf.merge copies it, never changes it."""
    return OmegaConf.structured(schema)


def as_schema(section: Any, schema: type[T], key: str) -> T:
    """A config section as its schema's object: from a node of the composed config (`cfg.data`),
    a mapping, or the object itself, checked against the schema either way. A key the schema does
    not have, a value of the wrong type or outside its Enum, and a key left `MISSING` are errors
    naming the key (UsageError), never dropped or passed on."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        obj = OmegaConf.to_object(OmegaConf.merge(_structured(schema), section))
    except OmegaConfBaseException as e:
        where = f"{key}.{e.full_key}" if getattr(e, "full_key", None) else key
        raise UsageError(f"{where}: {str(e).splitlines()[0]}") from None
    assert isinstance(obj, schema)
    return obj


def load_option(group: str, option: str) -> Any:
    """One option of a config group as its section's object (`load_option("data", "sample")` is a
    `DataConfig`), without composing the whole config: for tools and tests that need one section.
    The option's YAML over the section's schema, so every key is checked and none is dropped."""
    path = conf_dir() / group / f"{option}.yaml"
    if not path.is_file():
        raise UsageError(f"unknown option '{option}' for {group}; choose one of: "
                         f"{', '.join(sorted(p.stem for p in path.parent.glob('*.yaml')))}")
    values = OmegaConf.load(path)
    if group in OPTION_SCHEMAS or "defaults" in values:
        raise ValueError(f"{group}={option} has a defaults list: compose it (vicuna_exp.hydra_app.compose)")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(VicunaConfig)[group], values))


# Keys that do not change what is trained: excluded from the config hash, so a rerun that only
# changes where metrics go, or how it resumes, is still recognised as the same job.
# `optim.lr_by_method` is folded into `optim.lr` (the lr in force, hashed) when the config is composed.
_HASH_EXCLUDED = ("logger", "optim.lr_by_method", "optim.lr_source", "trainer.resume", "launcher.rdzv_endpoint", "launcher.rdzv_id",
                  "launcher.node_rank", "launcher.monitor_interval_s", "launcher.stall_timeout_s",
                  "launcher.stall_timeout_by_phase_s", "launcher.collective_timeout_s", "eval", "plan", "hardware",
                  "sky")

# The sections whose layout changed since hashes were first written, as that first layout had
# them: one union of every backend's keys, at these values. An option's hash form carries the keys
# its own schema lacks at these values, so configs hash as they always did (see `hash_form`).
V1_LAYOUT: dict[str, dict[str, Any]] = {
    "backend": {"sharding": "full", "reshard_after_forward": True, "cpu_offload": False, "zero_stage": 3,
                "offload_optimizer": False, "offload_params": False, "overlap_comm": True, "bucket_size_mb": 200},
    "logger": {"project": "vicuna-exp", "entity": None, "mode": "auto", "tags": [], "job_type": "train"},
}

# Keys added after hashes were first written, each with the value that reproduces the behaviour
# from before it existed. While a key holds that value it stays out of the hash, so adding a
# feature never sets aside existing checkpoints or reruns completed sweep jobs; a run dir written
# before the key existed reads it at that value (`_fill_later_keys`). An issue that adds
# a key to a hashed section registers it here; tests/test_config.py pins the shipped presets' hashes.

# Values that replaced an earlier spelling of the same behaviour, hashed as that spelling. The
# template's special tokens used to be spelt `<s>` / `</s>`, which every tokenizer the project knew
# then named as its own BOS and EOS; null (the tokenizer's own) hashes as they did.
HASH_AS_BEFORE: dict[str, tuple[Any, Any]] = {
    "template.bos_token": (None, "<s>"),
    "template.eos_token": (None, "</s>"),
}


# `EVERY_VALUE` marks a key whose every value trains the same model (only the order of the
# arithmetic differs), so it never enters the hash.
_ANY = object()
EVERY_VALUE = _ANY
HASH_NEUTRAL: dict[str, Any] = {
    "trainer.loss_chunk_tokens": EVERY_VALUE,  # chunked loss = full-logits loss within 1e-5 (tests/test_loss.py)
    # Where FSDP sums micro-batch gradients (in the shards after each reduce-scatter, or unsharded
    # before one): the same gradient, up to the order of fp32 additions.
    "backend.reduce_every_micro_batch": True,
    "finetune": SECTION_BEFORE_GROUP["finetune"],  # full: every parameter trains, as before the group
    "trainer.bytes_per_step": None,  # tokens per step from tokens_per_step / global_batch_size, as before
    "model.architecture": "LlamaConfig",
    "model.rope_scaling": None,
    "model.sliding_window": None,
    "template.special_tokens": [],  # Vicuna and Llama-2 chat write only {bos} / {eos}
}


def _pop(container: dict, dotted: str, *, only_if: Any = _ANY) -> None:
    node: Any = container
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.get(p, {}) if isinstance(node, dict) else {}
    if isinstance(node, dict) and leaf in node and (only_if is _ANY or node[leaf] == only_if):
        node.pop(leaf)


def hash_form(cfg: DictConfig) -> dict[str, Any]:
    """The canonical form `config_hash` hashes: the resolved config, less the keys that do not
    change what is trained and the later keys at their neutral values, with each option's
    section laid out as the first schema had it (`V1_LAYOUT`), and values that replaced an earlier
    spelling of the same behaviour spelt as before (`HASH_AS_BEFORE`)."""
    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert isinstance(container, dict)
    container.pop("hydra", None)
    for section, first in V1_LAYOUT.items():
        node = container.get(section)
        if isinstance(node, dict):
            for key, value in first.items():
                node.setdefault(key, value)
    for dotted in _HASH_EXCLUDED:
        _pop(container, dotted)
    for dotted, neutral in HASH_NEUTRAL.items():
        _pop(container, dotted, only_if=neutral)
    for dotted, (now, before) in HASH_AS_BEFORE.items():
        *parents, leaf = dotted.split(".")
        node: Any = container
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node and node[leaf] == now:
            node[leaf] = before
    return container


def config_hash(cfg: DictConfig) -> str:
    """A short content hash of everything that determines the trained model."""
    blob = json.dumps(hash_form(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def lr_in_force(cfg: DictConfig, overrides: list[str]) -> tuple[float, str]:
    """The learning rate a run trains at, and the key it came from.

    A preset's `optim.lr` is a full-fine-tuning value and experiment files come last among the
    defaults, so composition alone would train `experiment=vicuna-7b finetune=lora` at 2e-5. The
    precedence, highest first: `optim.lr` set on the command line (or by a sweep's axis); for
    `full`, `optim.lr`; else the preset's `optim.lr_by_method.<method>`; else the method's own
    `finetune.lr`."""
    method = str(cfg.finetune.name)
    if any(o.split("=", 1)[0].lstrip("+~") == "optim.lr" for o in overrides):
        return float(cfg.optim.lr), "optim.lr (command line)"
    if cfg.finetune.lr is None:
        return float(cfg.optim.lr), "optim.lr"
    if method in cfg.optim.lr_by_method:
        return float(cfg.optim.lr_by_method[method]), f"optim.lr_by_method.{method}"
    return float(cfg.finetune.lr), f"finetune.lr ({method} default)"


def with_lr_in_force(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """`optim.lr` set to the rate in force and `optim.lr_source` to where it came from, once, when
    the config is composed: every later reader (the ranks, the hash, the plan, reports) sees the lr
    that trains. A config that already has a source (a run dir's resolved config) is left alone."""
    if "finetune" not in cfg or "optim" not in cfg or OmegaConf.is_missing(cfg, "finetune") \
            or cfg.optim.lr_source is not None:
        return cfg
    cfg.optim.lr, cfg.optim.lr_source = lr_in_force(cfg, overrides)
    return cfg


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
    """Arithmetic across keys and ranges: what the schema's types and Enums cannot say.
    Raises UsageError naming the key."""

    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise UsageError(f"{key}: {msg}")

    require_resolvable(cfg)
    t, o = cfg.trainer, cfg.optim
    need(cfg.context.length > 0, "context.length", f"must be a positive number of tokens, got {cfg.context.length}")
    need(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    validate_finetune(cfg.finetune)
    need(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    need(0 <= o.warmup_ratio < 1, "optim.warmup_ratio", f"must be in [0, 1), got {o.warmup_ratio}")
    need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", f"must be two values in [0, 1), got {list(o.betas)}")
    need(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    need(t.micro_batch_size > 0, "trainer.micro_batch_size", f"must be > 0, got {t.micro_batch_size}")
    need(t.loss_chunk_tokens >= 0, "trainer.loss_chunk_tokens",
         f"must be >= 0 (0: the full-logits loss), got {t.loss_chunk_tokens}")
    if t.tokens_per_step is not None:
        need(t.tokens_per_step > 0, "trainer.tokens_per_step", f"must be > 0, got {t.tokens_per_step}")
        need(t.tokens_per_step % cfg.context.length == 0, "trainer.tokens_per_step",
             f"{t.tokens_per_step} is not a multiple of context.length={cfg.context.length}")
    if t.bytes_per_step is not None:
        need(t.bytes_per_step > 0, "trainer.bytes_per_step", f"must be > 0, got {t.bytes_per_step}")
        need(t.tokens_per_step is None, "trainer.bytes_per_step",
             f"set it or trainer.tokens_per_step={t.tokens_per_step}, not both: it derives the tokens per step")
    gbs = global_batch_size(cfg)
    need(gbs > 0, "trainer.global_batch_size", f"must be > 0, got {gbs}")
    ws = world_size(cfg)
    need(cfg.launcher.nproc_per_node > 0 and cfg.launcher.nnodes > 0, "launcher.nproc_per_node",
         "nproc_per_node and nnodes must be > 0")
    source = "trainer.tokens_per_step" if t.tokens_per_step is not None else "trainer.global_batch_size"
    split = batch_split.split_error(gbs, int(cfg.launcher.nproc_per_node), int(cfg.launcher.nnodes), source=source)
    if split and t.bytes_per_step is None:  # bytes_per_step derives whole rows per rank itself
        raise UsageError(split)
    need(t.epochs > 0, "trainer.epochs", f"must be > 0, got {t.epochs}")
    need(t.max_steps is None or t.max_steps > 0, "trainer.max_steps", f"must be > 0 or null, got {t.max_steps}")
    need(t.token_budget is None or t.bytes_per_step is not None or t.token_budget >= gbs * cfg.context.length,
         "trainer.token_budget",
         f"{t.token_budget} is less than one step ({gbs} rows x {cfg.context.length} tokens)")
    need(t.max_minutes is None or t.max_minutes > 0, "trainer.max_minutes", f"must be > 0 or null, got {t.max_minutes}")
    need(t.grad_clip >= 0, "trainer.grad_clip", f"must be >= 0 (0 disables), got {t.grad_clip}")
    need(t.keep_last >= 1, "trainer.keep_last", f"must be >= 1, got {t.keep_last}")
    need(t.log_every_steps >= 1, "trainer.log_every_steps", f"must be >= 1, got {t.log_every_steps}")
    for key in ("eval_every_steps", "save_every_steps"):
        v = t[key]
        need(v is None or v > 0, f"trainer.{key}", f"must be > 0 or null, got {v}")
    need(cfg.launcher.stall_timeout_s > 0, "launcher.stall_timeout_s", f"must be > 0, got {cfg.launcher.stall_timeout_s}")
    need(cfg.launcher.collective_timeout_s > 0, "launcher.collective_timeout_s",
         f"must be > 0, got {cfg.launcher.collective_timeout_s}")
    if cfg.logger.name == LoggerName.wandb:
        need(cfg.logger.init_timeout_s > 0, "logger.init_timeout_s", f"must be > 0, got {cfg.logger.init_timeout_s}")
    if cfg.backend.name == BackendName.fsdp:
        mesh_shape(cfg.backend.sharding, ws, int(cfg.launcher.nproc_per_node))  # the worker's mesh, checked here
    need(not (cfg.backend.name == BackendName.single and ws > 1), "backend",
         f"backend=single runs one process, but launcher asks for {ws}; choose backend=ddp, fsdp or deepspeed_zero3")
    m = cfg.model
    if m.init == ModelInit.pretrained:
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


def validate_finetune(ft: DictConfig) -> None:
    """Ranges of the method's keys (which modules exist is checked against the built model)."""
    if ft.lr is not None and ft.lr <= 0:
        raise UsageError(f"finetune.lr: must be > 0 or null, got {ft.lr}")
    if ft.name not in LORA_METHODS:
        return
    if ft.r < 1:
        raise UsageError(f"finetune.r: the adapter rank must be >= 1, got {ft.r}")
    if ft.lora_alpha <= 0:
        raise UsageError(f"finetune.lora_alpha: must be > 0, got {ft.lora_alpha}")
    if not 0 <= ft.lora_dropout < 1:
        raise UsageError(f"finetune.lora_dropout: must be in [0, 1), got {ft.lora_dropout}")
    if not ft.target_modules:
        raise UsageError("finetune.target_modules: name at least one module (all-linear: every linear layer)")


# Backends that shard the model: an adapter's state there is partitioned too.
SHARDING_BACKENDS = (BackendName.fsdp, BackendName.deepspeed)


def check_method_backend(cfg: DictConfig) -> None:
    """Training refuses a method its backend cannot run, before any worker starts (the planner
    still plans it). DoRA's magnitude vector is computed by peft from the whole base weight when the
    adapter is created, and its merge needs the whole weight's column norms: under sharding the base
    is on the meta device then, so the magnitudes would be garbage."""
    ft = cfg.finetune
    if ft.name == FinetuneMethod.full:
        return
    if ft.name == FinetuneMethod.qlora:
        check_qlora_backend(cfg)
        return
    if ft.name == FinetuneMethod.lora and ft.use_dora and cfg.backend.name in SHARDING_BACKENDS:
        raise UsageError(f"finetune.use_dora=true with backend.name={cfg.backend.name}: DoRA's magnitudes need the "
                         f"whole base weight, which a sharded backend never holds; use backend=single or ddp, "
                         f"or finetune.use_dora=false")


# Where bitsandbytes' 4-bit parameters can live: whole on each rank (they are not DTensors, and
# DeepSpeed's ZeRO partitions only floating-point parameters).
QLORA_BACKENDS = (BackendName.single, BackendName.ddp)


QLORA_INSTALL_HINT = "pip install 'vicuna-exp[qlora]'"


def check_qlora_backend(cfg: DictConfig) -> None:
    """`finetune=qlora` without bitsandbytes installed, on a backend that shards the base, or with
    DoRA (whose magnitudes and merge need the base weight whole in its own dtype): usage, saying
    what to install or naming the supported choices."""
    try:
        installed = importlib.util.find_spec("bitsandbytes") is not None
    except (ImportError, ValueError):
        installed = False
    if not installed:
        raise UsageError(f"finetune=qlora needs bitsandbytes, which is not installed: {QLORA_INSTALL_HINT}")
    if cfg.backend.name not in QLORA_BACKENDS:
        raise UsageError(f"finetune=qlora with backend.name={cfg.backend.name}: bitsandbytes' 4-bit parameters "
                         f"cannot be sharded; use backend=single or backend=ddp (or finetune=lora to shard the base)")
    if cfg.finetune.use_dora:
        raise UsageError("finetune.use_dora=true with finetune=qlora: DoRA over a 4-bit base is not supported; "
                         "use finetune.use_dora=false, or finetune=lora")
