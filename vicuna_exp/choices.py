"""Every closed set of choices the config offers, as an Enum the schema types its key with.

OmegaConf checks a value against its Enum at composition and names the key and the valid values
when it is not one of them, so no module compares a config value with a string of its own.
`StrEnum`, because the members are what the rest of the code passes around: each compares, hashes,
formats and serialises (JSON) as its value. Every member's name is its value, since OmegaConf
reads a member by name and `config_hash` writes the name.

This module imports nothing of the project: the section schemas (`config`, `data.config`,
`plan.config`, `eval.config`) all use it.

`choice_str` gives a choice as plain text whichever form it comes in (a member, or the text
of a key typed `str`).
"""

from __future__ import annotations

from enum import Enum, StrEnum


class AttnImpl(StrEnum):
    """`model.attn_implementation`."""

    auto = "auto"  # by device, packages and precision: `hardware.choose_attention`
    sdpa = "sdpa"
    eager = "eager"
    flash_attention_2 = "flash_attention_2"  # the flash-attn package
    varlen = "varlen"  # torch's own flash-attention-2 (`torch.nn.attention.varlen`), CUDA and bf16/fp16 only
    flex_attention = "flex_attention"  # torch's flex attention with a document mask


class Precision(StrEnum):
    """`trainer.precision`."""

    auto = "auto"  # bf16_mixed on a bf16-capable GPU, fp32 elsewhere
    fp32 = "fp32"  # fp32 weights, optimizer state and compute
    bf16_mixed = "bf16_mixed"  # fp32 master weights and optimizer state, bf16 compute
    bf16 = "bf16"  # bf16 weights and compute (optimizer state follows the weights)


BF16_PRECISIONS = (Precision.bf16, Precision.bf16_mixed)  # what needs a bf16-capable GPU


class ModelInit(StrEnum):
    """`model.init`."""

    pretrained = "pretrained"  # weights from model.path
    random = "random"  # initialised from the architecture facts in the config


class Schedule(StrEnum):
    """`optim.schedule`: the learning rate after warmup."""

    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class OptimizerName(StrEnum):
    """`optim.name`."""

    adamw = "adamw"


class Device(StrEnum):
    """`trainer.device`."""

    auto = "auto"  # cuda when a GPU is visible, else cpu
    cpu = "cpu"
    cuda = "cuda"


class FinetuneMethod(StrEnum):
    """`finetune.name`: which parameters train; each method has its own schema."""

    full = "full"  # every parameter
    lora = "lora"  # low-rank adapters through peft; the base stays frozen
    qlora = "qlora"  # the same adapters over a base frozen in bitsandbytes 4-bit


class QuantType(StrEnum):
    """`finetune.bnb_4bit_quant_type` (qlora): bitsandbytes' 4-bit data types."""

    nf4 = "nf4"  # NormalFloat4, QLoRA's: quantiles of a normal distribution
    fp4 = "fp4"


class ComputeDtype(StrEnum):
    """`finetune.bnb_4bit_compute_dtype` (qlora): what a 4-bit weight is dequantised into for its matmul."""

    bf16 = "bf16"  # fp32 on a CPU without native bf16 matmuls
    fp16 = "fp16"
    fp32 = "fp32"


class ExportDtype(StrEnum):
    """`trainer.export_dtype`: the dtype of the weights in final/."""

    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class ResumeMode(StrEnum):
    """The named values of `trainer.resume`; any other value is a checkpoint path, so the key
    itself stays a string."""

    auto = "auto"  # the latest complete checkpoint in the run dir, if any
    never = "never"  # start from step 0


class BackendName(StrEnum):
    """`backend.name`: which backend class runs; each has its own schema."""

    single = "single"
    ddp = "ddp"
    fsdp = "fsdp"
    deepspeed = "deepspeed"


class Sharding(StrEnum):
    """`backend.sharding` (fsdp)."""

    full = "full"  # shard over every rank
    hybrid = "hybrid"  # shard within a node, replicate across nodes (HSDP)


class DistBackend(StrEnum):
    """`launcher.dist_backend`."""

    auto = "auto"  # nccl on GPU, gloo on CPU
    nccl = "nccl"
    gloo = "gloo"


class LoggerName(StrEnum):
    """`logger.name`."""

    wandb = "wandb"
    none = "none"  # metrics.jsonl and summary.json only


class LoggerMode(StrEnum):
    """`logger.mode` (wandb)."""

    auto = "auto"  # online when an API key is configured, else offline
    online = "online"
    offline = "offline"
    disabled = "disabled"


class DataFormat(StrEnum):
    """`data.format`."""

    auto = "auto"  # from the first non-blank character: `[` is JSON, else JSONL
    json = "json"
    jsonl = "jsonl"


class Overflow(StrEnum):
    """`data.overflow`: a single (user, assistant) pair longer than the context."""

    split = "split"  # windows over the conversation's tokens, each reply token supervised once
    truncate = "truncate"  # keep the first context tokens
    drop = "drop"  # drop the pair


class SystemPolicy(StrEnum):
    """`data.system_policy`: a leading system message."""

    template = "template"  # fills the template's system slot
    drop = "drop"  # is removed


class NonAlternating(StrEnum):
    """`data.non_alternating`: consecutive turns of one role."""

    merge = "merge"  # joined by a blank line
    drop = "drop"  # the record is dropped


class DeviceType(StrEnum):
    """`hardware.device`: what a planned machine computes on."""

    cuda = "cuda"
    cpu = "cpu"


class Interconnect(StrEnum):
    """`hardware.interconnect`: between the devices of one node."""

    nvlink = "nvlink"
    pcie = "pcie"
    none = "none"


class StorageMode(StrEnum):
    """`sky.mode`: how SkyPilot mounts the checkpoint bucket."""

    MOUNT_CACHED = "MOUNT_CACHED"
    MOUNT = "MOUNT"


class EvalDtype(StrEnum):
    """`eval.dtype`: the dtype answers are generated in."""

    auto = "auto"  # bfloat16 on a bf16-capable GPU, else float32
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


def choice_str(value: object) -> str:
    """`Precision.bf16` -> "bf16"; "bf16" -> "bf16"."""
    return str(value.value) if isinstance(value, Enum) else str(value)
