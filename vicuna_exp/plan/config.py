"""Schemas of the `hardware` and `plan` sections: the machine a run is planned for, and the
assumptions the planner makes about it.

Plain values on purpose: prices and peak rates change, so a user edits a number in
`conf/hardware/*.yaml` (or overrides it on the command line) rather than code. Memory sizes are
GiB (2**30 bytes), the unit nvidia-smi and DeepSpeed's estimators print as "GB".
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from vicuna_exp.choices import DeviceType, Interconnect, StorageMode


@dataclass
class HardwareConfig:
    """One accelerator type; a node holds `gpus_per_node` of them. Every value comes from the
    `conf/hardware/` option."""

    name: str = MISSING  # auto: the facts below come from the device (vicuna_exp/hardware.py)
    # The facts are null only under `hardware=auto`, which fills them in when the device is resolved.
    device: DeviceType | None = MISSING  # cuda | cpu: what `trainer.precision=auto` resolves against
    accelerator: str | None = MISSING  # SkyPilot's name for it (A100, A100-80GB, H100); None on a CPU
    gpu_memory_gb: float | None = MISSING  # usable memory of one device, GiB (on a CPU: the host RAM)
    bf16_tflops: float | None = MISSING  # peak dense bf16 TFLOP/s of one device (datasheet, no sparsity)
    fp32_tflops: float | None = MISSING  # peak fp32 TFLOP/s of one device (no TF32: torch leaves it off)
    interconnect: Interconnect | None = MISSING  # within a node: nvlink | pcie | none
    gpus_per_node: int | None = MISSING  # devices in one node (most clouds: 8)
    cpu_memory_gb: float | None = MISSING  # host RAM of one node, GiB: bounds CPU offload
    on_demand_usd_per_gpu_hour: float | None = MISSING
    spot_usd_per_gpu_hour: float | None = MISSING
    # The profile `plan` uses under hardware=auto on a machine without a GPU (the presets: a100-80gb).
    reference: str | None = MISSING
    strict: bool = MISSING  # true: a profile that contradicts the device found is an error (exit 2)


@dataclass
class PlanConfig:
    """What the planner assumes beyond the config; every figure here shows up in its printout."""

    enforce: bool = True  # train refuses a config the plan says does not fit
    assumed_mfu: float = 0.40  # model FLOPs utilisation used for tokens/s and time estimates
    # Training tokens in one epoch: this value when set; else the prepared dataset's stats when
    # they exist; else conversations x tokens_per_conversation.
    tokens_per_epoch: int | None = None
    conversations: int = 70_000  # Vicuna's ShareGPT set: ~70K user-shared conversations
    tokens_per_conversation: int = 1_200  # rough LLaMA-tokenizer mean for a cleaned ShareGPT conversation
    # UTF-8 bytes of conversation per token, for planning a run under `trainer.bytes_per_step` (training
    # measures its own on the prepared data and records it in summary.json's `derived`).
    bytes_per_token: float = 3.8  # LLaMA-2's 32k vocabulary: 3.81 on ShareGPT V3 (Llama-3's 128k: 4.46)
    cuda_context_gb: float = 1.0  # per-process CUDA context + kernels, GiB (0 on a CPU device)
    fragmentation: float = 0.10  # allocator overhead, as a fraction of the tensors it holds
    tight_margin: float = 0.05  # a plan that fits with less than this fraction free says "tight"


@dataclass
class SkyConfig:
    """`vicuna-exp sky`: how the SkyPilot task for a composed config is written."""

    name: str | None = None  # task / managed-job name; default: the experiment (or model) name
    bucket: str | None = None  # checkpoint bucket URL, e.g. s3://my-ckpts/vicuna or gs://my-ckpts
    mount: str = "/checkpoints"  # where the bucket appears on every node; run dirs live under it
    mode: StorageMode = StorageMode.MOUNT_CACHED  # SkyPilot storage mode: MOUNT_CACHED (recommended for checkpoints) | MOUNT
    use_spot: bool = True  # managed spot: preempted jobs are relaunched and resume from the bucket
    cloud: str | None = None  # aws | gcp | azure | ... ; None lets SkyPilot pick the cheapest
    region: str | None = None
    disk_size: int = 512  # GB of local disk per node (weights, data cache)
    workdir: str = "."  # synced to every node; the project is installed from it
    setup: str = "pip install -e ."  # run once per node before `run`
    # passed to every node (e.g. LLAMA_ROOT); secrets get an empty value here and `--env NAME` at launch
    envs: dict[str, str | None] = field(default_factory=dict)
    file_mounts: dict[str, str] = field(default_factory=dict)  # remote path -> local path or bucket URL (weights)
    max_restarts_on_errors: int = 0  # relaunches after a non-preemption failure
    output: str = "outputs/sky"  # where the task YAMLs are written
    sweep: str | None = None  # a sweeps/NAME.yaml: write one managed job per sweep point
