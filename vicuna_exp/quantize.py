"""QLoRA's frozen base (`finetune=qlora`): the decoder's linear layers held in bitsandbytes 4-bit.

Every `nn.Linear` inside a decoder layer becomes a `bitsandbytes.nn.Linear4bit` whose weight is
quantised blockwise (`QUANT_BLOCKSIZE` values per absmax constant; with double quantisation the
absmax constants are themselves quantised to 8 bits, as `plan.adapters` counts them). The embeddings,
norms and LM head stay in the base's storage dtype, as transformers' bitsandbytes path keeps them.
The matmul runs in the compute dtype (`finetune.bnb_4bit_compute_dtype`): the weight is
dequantised into it for each forward and backward, never kept.

A pretrained base is quantised as it is read: the model is built on the meta device and each
linear weight goes from the safetensors file straight into its 4-bit form, one tensor at a time,
so the whole model never exists in 16 or 32 bits (`bench/bench_qlora_load.py` measures the peak).
A random-init base is built as `finetune=lora` builds it, from the seed, and quantised in place.

bitsandbytes on a CPU that has AVX512-BF16 repacks a Linear4bit's weight into an inference layout
the first time it runs without gradients (evaluation); its training matmul cannot use that layout,
and the merge reads the canonical one, so the repacking is switched off. The optional
`kernels` package it warns about at import ("Failed to load CPU gemm_4bit_forward from
kernels-community") would only speed up that inference path (bitsandbytes then uses its own C
kernel for it): the package's `__init__` drops that warning.

Checkpoints hold what trains: a Linear4bit's `state_dict()` is a plain module's (its frozen packed
weight, which the checkpoint skips), not bitsandbytes' serialisation of the quantisation constants;
on resume the base is quantised again from `model.path` (or the seed), the same way.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from vicuna_exp.choices import ComputeDtype, FinetuneMethod
from vicuna_exp.config import QLORA_INSTALL_HINT
from vicuna_exp.errors import UsageError
from vicuna_exp.plan.adapters import QUANT_BLOCKSIZE

log = logging.getLogger(__name__)



def is_quantized(finetune: Any) -> bool:
    """True for the method that holds its frozen base in 4 bits."""
    return finetune is not None and FinetuneMethod(finetune.name) == FinetuneMethod.qlora


def import_bitsandbytes() -> Any:
    """bitsandbytes, or a UsageError saying what to install."""
    try:
        import bitsandbytes
    except ImportError as e:
        raise UsageError(f"finetune=qlora needs bitsandbytes, which cannot be imported ({e}): {QLORA_INSTALL_HINT}") from None
    return bitsandbytes


def cpu_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); without, torch emulates it slowly."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def compute_dtype(requested: ComputeDtype, device: torch.device) -> torch.dtype:
    """The dtype the 4-bit matmuls run in: as requested, except bf16 on a CPU that cannot multiply
    bf16 natively, which falls back to fp32 (said in the log)."""
    dtype = {ComputeDtype.bf16: torch.bfloat16, ComputeDtype.fp16: torch.float16,
             ComputeDtype.fp32: torch.float32}[ComputeDtype(requested)]
    if dtype == torch.bfloat16 and device.type == "cpu" and not cpu_bf16_matmul():
        log.info("finetune.bnb_4bit_compute_dtype=bf16: this CPU has no native bf16 matmul; computing in fp32")
        return torch.float32
    return dtype


def quantized_linear_names(model: torch.nn.Module, layers: list[torch.nn.Module]) -> list[str]:
    """The module names of the linear layers to hold in 4 bits: every one inside a decoder layer."""
    ids = {id(m) for m in layers}
    out = []
    for name, module in model.named_modules():
        if id(module) in ids:
            out += [f"{name}.{sub}" for sub, m in module.named_modules() if sub and isinstance(m, torch.nn.Linear)]
    return out


def _set_module(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_freed_memory() -> None:
    """Hand the memory of the tensors just freed back to the OS (glibc). Without it, glibc keeps
    the freed full-precision weights of the layers already quantised in its heap, and the process's
    resident size grows to about the bf16 model's even though no two of them are alive at once
    (`bench/bench_qlora_load.py`)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def quantize_linears(model: torch.nn.Module, layers: list[torch.nn.Module], finetune: Any, device: torch.device,
                     read: Callable[[str], torch.Tensor], dtype: torch.dtype) -> int:
    """Replace each decoder linear by a Linear4bit quantised on `device` from `read(param name)`
    (the weight in `dtype`, the dtype dequantisation returns), one layer at a time. The original
    layer may be on the meta device. Marks the model as peft expects of a 4-bit base. Returns how
    many layers were quantised."""
    bnb = import_bitsandbytes()
    quant_type, double = str(finetune.bnb_4bit_quant_type), bool(finetune.bnb_4bit_use_double_quant)
    cdtype = compute_dtype(finetune.bnb_4bit_compute_dtype, device)
    names = quantized_linear_names(model, layers)
    for name in names:
        old = model.get_submodule(name)
        new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None, compute_dtype=cdtype,
                                compress_statistics=double, quant_type=quant_type, device="meta")
        new.support_avx512bf16_for_cpu = False  # keep the layout training and the merge read (module doc)
        # state_dict() as a plain module's: Linear4bit adds its quantisation constants, which are no
        # parameters, so a checkpoint (which skips the frozen ones) would hold the base's constants too.
        new._save_to_state_dict = types.MethodType(torch.nn.Module._save_to_state_dict, new)
        weight = read(f"{name}.weight").to(dtype)
        new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=quant_type, blocksize=QUANT_BLOCKSIZE,
                                       compress_statistics=double, module=new).to(device)
        if old.bias is not None:
            new.bias = torch.nn.Parameter(read(f"{name}.bias").to(device=device, dtype=dtype), requires_grad=False)
        new.compute_type_is_set = True  # the compute dtype is ours, not guessed from the first input
        new.train(old.training)
        _set_module(model, name, new)
        del old, weight
        release_freed_memory()
    model.is_loaded_in_4bit = True  # what peft reads to wrap Linear4bit layers with its 4-bit LoRA layer
    return len(names)


def quantize_in_place(model: torch.nn.Module, layers: list[torch.nn.Module], finetune: Any,
                      dtype: torch.dtype) -> torch.nn.Module:
    """A base built whole (random init) with its decoder linears replaced by their 4-bit form."""
    device = next(model.parameters()).device
    params = dict(model.named_parameters())
    quantize_linears(model, layers, finetune, device, lambda name: params[name].detach(), dtype)
    return model


@torch.no_grad()
def load_quantized(model: torch.nn.Module, layers: list[torch.nn.Module], path: Path, finetune: Any,
                   device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A meta-device base filled from the safetensors under `path`: each decoder linear quantised as
    its weight is read, every other tensor materialised and copied in `dtype`, one at a time."""
    from vicuna_exp.weights import SafetensorsModel, rebuild_buffers

    with SafetensorsModel(path) as src:
        def read(name: str) -> torch.Tensor:
            if name not in src:
                raise UsageError(f"model.path={path}: the checkpoint lacks {name} "
                                 "(is it a Hugging Face checkpoint of this architecture?)")
            value = src.read(name)
            src.close()  # unmap the file: the pages read stay out of this process's resident size
            return value

        quantize_linears(model, layers, finetune, device, read, dtype)
        for module in model.modules():
            own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
            if any(t.device.type == "meta" for _, t in own):
                module.to_empty(device=device, recurse=False)
        if getattr(model.config, "tie_word_embeddings", False):
            model.tie_weights()
        for name, p in model.named_parameters():  # a tied weight appears once
            if not hasattr(p, "quant_state"):
                value = read(name)
                if tuple(value.shape) != tuple(p.shape):
                    raise UsageError(f"model.path={path}: {name} has shape {list(value.shape)} but the model "
                                     f"expects {list(p.shape)}")
                p.copy_(value.to(p.dtype))
    rebuild_buffers(model)
    return model


def dequantized(param: torch.Tensor) -> torch.Tensor:
    """A parameter whole: a 4-bit weight dequantised (in the dtype it was quantised from), any
    other as it is."""
    state = getattr(param, "quant_state", None)
    if state is None:
        return param.detach()
    from bitsandbytes.functional import dequantize_4bit

    return dequantize_4bit(param.data, state)


def quant_state_tensors(param: torch.Tensor) -> Iterator[torch.Tensor]:
    """The tensors a 4-bit weight keeps beside its packed data: the absmax constants and, once
    double-quantised, their scales, their code and the offset."""
    state = getattr(param, "quant_state", None)
    if state is None:
        return
    yield from (t for t in (state.absmax, state.code, state.offset) if torch.is_tensor(t))
    if state.state2 is not None:
        yield from (t for t in (state.state2.absmax, state.state2.code) if torch.is_tensor(t))
