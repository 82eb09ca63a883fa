"""The hardware a run is on: what the driver reports, and which `conf/hardware/` profile describes it.

`hardware=auto` (the default) takes its facts from the device: a known GPU gets its profile, an
unknown one its memory from the driver and its peak FLOP/s from a table of chips (with a warning
when the chip is not in it), and no GPU means the CPU profile. A named profile that contradicts the
device found gives a warning and the device wins, unless `hardware.strict=true` (exit 2).

The device is probed without creating a CUDA context in this process (nvidia-smi, which asks NVML),
so the parent job of a multi-GPU run does not hold GPU 0's memory while its workers train. Planning
on a machine without a GPU uses the preset's reference profile (`hardware.reference`).

Precision and the attention kernel are resolved here as well, by one rule each for the planner,
the parent job and the ranks: `resolve_attention` takes `AttentionFacts` (the device, the compute
dtype, what is installed), so tests fake them and the planner asks no GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vicuna_exp.choices import BF16_PRECISIONS, AttnImpl, Device, DeviceType, Precision, choice_str
from vicuna_exp.errors import UsageError

log = logging.getLogger(__name__)

AUTO = "auto"
CPU_PROFILE = "cpu"
GIB = 2**30
PROFILE_DIR = Path(__file__).resolve().parent.parent / "conf" / "hardware"

# Device names as the driver spells them -> the profile that describes them, first match wins.
PROFILE_OF_DEVICE: tuple[tuple[str, str], ...] = (
    (r"\bH200\b", "h200"),
    (r"\bH100\b.*(SXM|HBM3)|\bH100 80GB HBM3\b", "h100-80gb"),
    (r"\bA100\b.*80\s?GB", "a100-80gb"),
    (r"\bA100\b", "a100-40gb"),
)
# Dense (no sparsity) peak TFLOP/s of chips without a profile of their own, from NVIDIA's
# datasheets: (bf16, fp32). Memory always comes from the driver.
PEAKS_OF_CHIP: tuple[tuple[str, tuple[float, float]], ...] = (
    (r"\bH100\b.*PCIe", (756.0, 51.0)),
    (r"\bL40S\b", (362.0, 91.6)),
    (r"\bL4\b", (121.0, 30.3)),
    (r"\bA10G?\b", (125.0, 31.2)),
)
# Keys of the hardware section that say how to resolve it, not what the hardware is.
SETTINGS = ("reference", "strict")
# A named profile and the device agree when their memory differs by less than this fraction.
MEMORY_TOLERANCE = 0.05


@dataclass(frozen=True)
class DeviceFacts:
    """One visible GPU model as the driver reports it, and how many this process may use."""

    name: str
    memory_gib: float
    count: int
    compute_capability: float | None = None  # 8.0 and up run bf16 (Ampere and later)

    @property
    def bf16(self) -> bool:
        return self.compute_capability is None or self.compute_capability >= 8.0


@functools.cache
def probe_gpus() -> DeviceFacts | None:
    """The visible GPUs (the first one's model), or None: from nvidia-smi, never a CUDA context here."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=index,name,memory.total,compute_cap", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("nvidia-smi failed (%s): planning as if there were no GPU", e)
        return None
    rows = [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.count(",") >= 2]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        wanted = {v.strip() for v in visible.split(",") if v.strip()}
        rows = [r for r in rows if r[0] in wanted]
    if not rows:
        return None
    _, name, mib, *rest = rows[0]
    try:
        capability = float(rest[0]) if rest else None
    except ValueError:  # an old driver answers "[N/A]"
        capability = None
    return DeviceFacts(name=name, memory_gib=float(mib) / 1024, count=len(rows), compute_capability=capability)


def device_from_torch() -> DeviceFacts | None:
    """This rank's GPU as torch sees it: only for a process that trains on it (it holds a CUDA
    context already), never the parent job or the planner, which stay free of torch."""
    import torch  # the planner imports this module; it must not pay for torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return DeviceFacts(name=props.name, memory_gib=props.total_memory / GIB, count=torch.cuda.device_count(),
                       compute_capability=float(f"{props.major}.{props.minor}"))


def load_profile(name: str) -> dict[str, Any]:
    """A `conf/hardware/NAME.yaml` profile as plain values."""
    path = PROFILE_DIR / f"{name}.yaml"
    if not path.is_file():
        choices = ", ".join(sorted(p.stem for p in PROFILE_DIR.glob("*.yaml")))
        raise UsageError(f"hardware={name}: no such profile; choose one of: {choices}")
    values = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    assert isinstance(values, dict)
    return {k: v for k, v in values.items() if k not in SETTINGS}


def profile_for(device: DeviceFacts) -> tuple[dict[str, Any], str | None]:
    """The facts of this GPU: its profile when known, else the driver's memory and the chip's peaks.

    Returns (facts, warning or None)."""
    for pattern, profile in PROFILE_OF_DEVICE:
        if re.search(pattern, device.name, flags=re.I):
            facts = load_profile(profile)
            facts["gpu_memory_gb"] = round(device.memory_gib, 1)  # what this card really has
            return facts, None
    facts = load_profile(CPU_PROFILE) | {
        "name": re.sub(r"[^a-z0-9]+", "-", device.name.lower()).strip("-"), "device": DeviceType.cuda.value,
        "accelerator": None, "gpu_memory_gb": round(device.memory_gib, 1), "gpus_per_node": device.count,
        "interconnect": None, "on_demand_usd_per_gpu_hour": 0.0, "spot_usd_per_gpu_hour": 0.0}
    for pattern, (bf16, fp32) in PEAKS_OF_CHIP:
        if re.search(pattern, device.name, flags=re.I):
            facts.update(bf16_tflops=bf16, fp32_tflops=fp32)
            return facts, None
    facts.update(bf16_tflops=None, fp32_tflops=None)
    return facts, (f"{device.name}: peak FLOP/s unknown, so MFU is not reported; set hardware.bf16_tflops and "
                   "hardware.fp32_tflops (and the prices) for this GPU")


@dataclass(frozen=True)
class Resolved:
    """The facts a run plans and trains with, and where they came from (recorded in summary.json)."""

    facts: dict[str, Any]
    source: str
    warnings: tuple[str, ...] = ()


def resolve(hw: Any, *, on_gpu: bool | None, device: DeviceFacts | None = None, local: bool = True) -> Resolved:
    """The hardware facts for a config's `hardware` node.

    `on_gpu`: whether the run trains on a GPU (True/False), or None when planning, which follows
    whatever this machine has. `device` defaults to what the driver reports here; `local=False`
    plans for another machine (a cloud task), so this one's GPUs are not asked.
    """
    if device is None and on_gpu is not False and local:
        device = probe_gpus()
    if device is None and on_gpu and local:  # a GPU rank where nvidia-smi is missing (some containers)
        device = device_from_torch()
    named = str(hw.name)
    given = {k: v for k, v in _plain(hw).items() if k not in SETTINGS}
    if on_gpu is False and named not in (AUTO, CPU_PROFILE) and given.get("device") != DeviceType.cpu:
        problem = f"hardware={named} describes a GPU, but this run trains on the CPU"
        if hw.strict:
            raise UsageError(f"{problem}; use hardware=auto, or hardware.strict=false to let the device win")
        return Resolved(load_profile(CPU_PROFILE), "hardware=cpu: the run trains on the CPU",
                        (f"{problem}; the device wins (hardware.strict=true refuses)",))
    if on_gpu is False or device is None:
        if named != AUTO:
            return Resolved(given, f"hardware={named}")
        if on_gpu is None and hw.reference:
            facts = load_profile(str(hw.reference))
            return Resolved(facts, f"hardware={hw.reference}, the preset's reference profile (no GPU here)")
        return Resolved(load_profile(CPU_PROFILE), "hardware=cpu (no GPU here)")
    facts, warning = profile_for(device)
    warnings = (warning,) if warning else ()
    found = f"{device.name} ({device.memory_gib:.1f} GiB)"
    if named == AUTO:
        return Resolved(facts, f"hardware=auto: {facts['name']} from the device found, {found}", warnings)
    contradiction = _contradiction(given, device)
    if contradiction is None:
        return Resolved(given | {"gpu_memory_gb": facts["gpu_memory_gb"]}, f"hardware={named}, matching {found}")
    if hw.strict:
        raise UsageError(f"hardware={named}: {contradiction}; use hardware=auto, or hardware.strict=false to let "
                         "the device win")
    return Resolved(facts, f"hardware={named} contradicts the device; using {facts['name']} from {found}",
                    (*warnings, f"hardware={named}: {contradiction}; the device wins (hardware.strict=true refuses)"))


def _contradiction(given: dict[str, Any], device: DeviceFacts) -> str | None:
    if given.get("device") != DeviceType.cuda:
        return f"the profile is for a {given.get('device')} but this machine has {device.count} x {device.name}"
    memory = float(given.get("gpu_memory_gb") or 0)
    if abs(memory - device.memory_gib) > MEMORY_TOLERANCE * device.memory_gib:
        return (f"the profile says {memory:g} GiB per GPU but {device.name} has {device.memory_gib:.1f} GiB")
    return None


def _plain(node: Any) -> dict[str, Any]:
    if isinstance(node, DictConfig):
        values = OmegaConf.to_container(node, resolve=True, enum_to_str=True)
        assert isinstance(values, dict)
        return values
    return dict(node)


def with_resolved_hardware(cfg: DictConfig, *, on_gpu: bool | None, local: bool = True) -> tuple[DictConfig, Resolved]:
    """A copy of `cfg` whose `hardware` section holds the resolved facts, which the planner and the
    trainer then read as they read any profile; warnings are logged once here."""
    resolved = resolve(cfg.hardware, on_gpu=on_gpu, local=local)
    for warning in resolved.warnings:
        log.warning("%s", warning)
    out = cfg.copy()
    for key, value in resolved.facts.items():
        if key in out.hardware:
            out.hardware[key] = value
    return out, resolved


def resolve_precision(requested: str, *, on_cuda: bool, bf16_supported: bool = True) -> Precision:
    """`auto` = bf16 compute over fp32 master weights on a bf16 GPU, plain fp32 elsewhere. The
    planner (which knows the profile) and the trainer (which asks the device) both call this."""
    if requested == Precision.auto:
        return Precision.bf16_mixed if on_cuda and bf16_supported else Precision.fp32
    if requested in BF16_PRECISIONS and on_cuda and not bf16_supported:
        raise UsageError(f"trainer.precision={requested}: this GPU does not support bf16; use fp32")
    return Precision(requested)


@dataclass(frozen=True)
class AttentionFacts:
    """What decides which attention kernels can run: the device, the compute dtype, and what is
    installed. Probed by `probe_attention`; tests build them by hand."""

    on_cuda: bool
    half: bool  # computes in bf16 or fp16 (fp32 weights under autocast count as bf16)
    flash_attn: bool  # the flash-attn package is importable
    torch_varlen: bool  # this torch ships torch.nn.attention.varlen
    torch_flex: bool  # this torch ships torch.nn.attention.flex_attention


def _torch_ships(relative: str) -> bool:
    """Whether the installed torch has the file `relative`, found without importing torch (the planner
    and the parent job pay nothing for the question)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return False
    return (Path(spec.origin).parent / relative).is_file()


def probe_attention(*, on_cuda: bool, precision: str) -> AttentionFacts:
    """The attention facts of this machine for a run on CUDA or not, at its resolved precision."""
    return AttentionFacts(on_cuda=on_cuda, half=Precision(precision) in BF16_PRECISIONS,
                          flash_attn=importlib.util.find_spec("flash_attn") is not None,
                          torch_varlen=_torch_ships("nn/attention/varlen.py"),
                          torch_flex=_torch_ships("nn/attention/flex_attention.py"))


def choose_attention(facts: AttentionFacts) -> tuple[AttnImpl, str]:
    """What `auto` picks, and why. On CUDA in bf16/fp16: flash-attn when installed, else torch's varlen,
    else flex, else sdpa; in fp32 on CUDA: flex, else sdpa (the varlen kernels are half-precision
    only); on the CPU: sdpa (flex has no backward there)."""
    if not facts.on_cuda:
        return AttnImpl.sdpa, "on the CPU"
    where = f"on CUDA in {'bf16' if facts.half else 'fp32'}"
    if facts.half and facts.flash_attn:
        return AttnImpl.flash_attention_2, f"{where}, flash-attn installed"
    if facts.half and facts.torch_varlen:
        return AttnImpl.varlen, f"{where}, flash-attn not installed, torch has varlen attention"
    if facts.torch_flex:
        return AttnImpl.flex_attention, f"{where}" + (", neither flash-attn nor torch varlen" if facts.half else "")
    return AttnImpl.sdpa, f"{where}, this torch has neither varlen nor flex attention"


def attention_refusal(requested: AttnImpl, facts: AttentionFacts) -> str | None:
    """Why `requested` cannot run with these facts, or None when it can."""
    if requested == AttnImpl.flash_attention_2:
        if not facts.on_cuda:
            return "no CUDA device"
        if not facts.flash_attn:
            return "the flash-attn package is not installed (pip install '.[gpu]', or varlen: torch's own)"
    if requested == AttnImpl.varlen:
        if not facts.torch_varlen:
            return "this torch has no torch.nn.attention.varlen (torch >= 2.10 has it)"
        if not facts.on_cuda:
            return "torch's varlen attention is CUDA-only"
        if not facts.half:
            return "torch's varlen attention computes in bf16/fp16 only, and this run is fp32"
    if requested == AttnImpl.flex_attention:
        if not facts.torch_flex:
            return "this torch has no torch.nn.attention.flex_attention"
        if not facts.on_cuda:
            return "torch's flex attention has no backward on the CPU, so it cannot train there"
    return None


NAMED_ATTENTION = "named by model.attn_implementation"  # the reason of a kernel the config names


@dataclass(frozen=True)
class AttentionChoice:
    """The kernel a run trains with, and why (recorded in summary.json and shown in the plan)."""

    impl: AttnImpl
    reason: str = NAMED_ATTENTION


def resolve_attention(requested: str, facts: AttentionFacts) -> AttentionChoice:
    """The kernel a run trains with: `auto` by `choose_attention`, or the requested one when it can
    run here, else UsageError naming why and what `auto` would pick. The planner, the job and the
    trainer all call this."""
    chosen, why = choose_attention(facts)
    if requested == AttnImpl.auto:
        return AttentionChoice(chosen, f"auto: {why}")
    impl = AttnImpl(requested)
    refusal = attention_refusal(impl, facts)
    if refusal is not None:
        raise UsageError(f"model.attn_implementation={impl} cannot run here: {refusal}; "
                         f"auto would pick {chosen} ({why})")
    return AttentionChoice(impl)


def _torch_built_with_cuda() -> bool:
    import torch  # only the parent job asks, and it has imported torch already

    return torch.version.cuda is not None


def attention_before_launch(cfg: DictConfig) -> AttentionChoice | None:
    """The attention a `vicuna-exp train` job will train with, decided in the parent job before any
    worker starts, so a kernel that cannot run here exits 2 at once. The device comes from the driver
    (no CUDA context here); None when that cannot tell (`trainer.device=auto`, a CUDA build of torch
    and no nvidia-smi, as in some containers): each rank then decides on its own device, by the
    same rule, and still exits 2 before training."""
    device = choice_str(cfg.trainer.device)
    gpu = probe_gpus() if device != Device.cpu else None
    if device == Device.auto and gpu is None and shutil.which("nvidia-smi") is None and _torch_built_with_cuda():
        return None
    on_cuda = device == Device.cuda or (device == Device.auto and gpu is not None)
    precision = resolve_precision(choice_str(cfg.trainer.precision), on_cuda=on_cuda,
                                  bf16_supported=gpu.bf16 if gpu is not None else True)
    return resolve_attention(choice_str(cfg.model.attn_implementation),
                             probe_attention(on_cuda=on_cuda, precision=precision))
