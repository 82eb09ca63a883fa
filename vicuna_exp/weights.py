"""Reading a Hugging Face safetensors model into parameters that are already sharded.

Each rank reads only the rows it owns (`safe_open(...).get_slice`), so eight ranks loading a
13B model never make eight full copies in host memory, and no rank ever holds the whole model.
Three layouts are covered: FSDP2 (DTensor shards), DeepSpeed ZeRO-3 (flat `ds_tensor`
partitions) and whole tensors (single, DDP, ZeRO-2), which are filled one tensor at a time.

An adapter model (peft) is loaded the same way: its base parameters are read under the names they
have in the base checkpoint (`finetune.base_name` undoes peft's `base_layer` renaming), and its
adapters, which no checkpoint holds, are filled from the in-memory initial values given as `extra`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from vicuna_exp.errors import UsageError
from vicuna_exp.finetune import base_name

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class SafetensorsModel:
    """The tensors of a model directory by name, opened lazily, read by slice."""

    def __init__(self, path: Path | str) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        index = self.path / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.path / SINGLE_FILE).is_file():
            weight_map = None
        else:
            raise UsageError(f"model.path={self.path}: no {SINGLE_FILE} or {INDEX_FILE} "
                             "(only safetensors weights can be loaded sharded)")
        self._stack = ExitStack()
        self._open: dict[str, Any] = {}
        self._safe_open = safe_open
        if weight_map is None:
            handle = self._file(SINGLE_FILE)
            weight_map = {name: SINGLE_FILE for name in handle.keys()}
        self.weight_map: dict[str, str] = weight_map
        self.elements_read = 0  # how much this process read: tests check that it is only its share

    def _file(self, name: str) -> Any:
        if name not in self._open:
            self._open[name] = self._stack.enter_context(self._safe_open(str(self.path / name), "pt"))
        return self._open[name]

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def names(self) -> list[str]:
        return list(self.weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file(self.weight_map[name]).get_slice(name).get_shape())

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> torch.Tensor:
        """The whole tensor, or the block `index` of it (one slice per leading dim)."""
        sl = self._file(self.weight_map[name]).get_slice(name)
        t = sl[:] if index is None else sl[index]
        self.elements_read += t.numel()
        return t

    def read_flat(self, name: str, start: int, end: int) -> torch.Tensor:
        """Elements [start, end) of the tensor flattened in row-major order, reading only the rows that hold them."""
        shape = self.shape(name)
        if not shape:
            return self.read(name).reshape(-1)[start:end]
        row = 1
        for d in shape[1:]:
            row *= d
        r0, r1 = start // row, (end - 1) // row + 1
        block = self.read(name, (slice(r0, r1),)).reshape(-1)
        return block[start - r0 * row:end - r0 * row]

    def close(self) -> None:
        self._stack.close()
        self._open.clear()

    def __enter__(self) -> SafetensorsModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ModelWeights:
    """The tensors a model's parameters are filled from, by the model's own parameter names: the
    checkpoint's (a peft model's names mapped to the base's), or `extra` (adapters' initial values)."""

    def __init__(self, src: SafetensorsModel, extra: dict[str, torch.Tensor] | None = None) -> None:
        self.src, self.path, self.extra, self._name = src, src.path, extra or {}, base_name

    def __contains__(self, name: str) -> bool:
        return name in self.extra or self._name(name) in self.src

    def checkpoint_name(self, name: str) -> str:
        return self._name(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.extra[name].shape) if name in self.extra else self.src.shape(self._name(name))

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> torch.Tensor:
        if name in self.extra:
            return self.extra[name] if index is None else self.extra[name][index]
        return self.src.read(self._name(name), index)

    def read_flat(self, name: str, start: int, end: int) -> torch.Tensor:
        if name in self.extra:
            return self.extra[name].reshape(-1)[start:end]
        return self.src.read_flat(self._name(name), start, end)

    @property
    def elements_read(self) -> int:
        return self.src.elements_read


def _check_names(model_names: list[str], src: ModelWeights) -> None:
    missing = [src.checkpoint_name(n) for n in model_names if n not in src]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UsageError(f"model.path={src.path}: the checkpoint lacks {shown} "
                         "(is it a Hugging Face checkpoint of this architecture?)")


def _check_shape(name: str, want: tuple[int, ...], src: ModelWeights) -> None:
    have = src.shape(name)
    if tuple(want) != have:
        raise UsageError(f"model.path={src.path}: {src.checkpoint_name(name)} has shape {list(have)} but the model "
                         f"expects {list(want)}")


@torch.no_grad()
def load_dtensor_shards(model: torch.nn.Module, path: Path | str, extra: dict[str, torch.Tensor] | None = None) -> int:
    """FSDP2: copy into every DTensor parameter the block of the checkpoint its local shard covers.

    Returns the number of elements this rank read.
    """
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    params = list(model.named_parameters())  # a tied weight appears once
    with SafetensorsModel(path) as checkpoint:
        src = ModelWeights(checkpoint, extra)
        _check_names([n for n, _ in params], src)
        for name, p in params:
            _check_shape(name, tuple(p.shape), src)
            if isinstance(p, DTensor):
                local = p.to_local()
                shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
                if local.numel() == 0:
                    continue
                block = src.read(name, tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True)))
                local.copy_(block.to(local.dtype))
            else:
                p.copy_(src.read(name).to(p.dtype))
        return src.elements_read


@torch.no_grad()
def load_zero3_partitions(model: torch.nn.Module, path: Path | str, rank: int,
                          assign: Callable[[torch.nn.Parameter, torch.Tensor], None],
                          extra: dict[str, torch.Tensor] | None = None) -> int:
    """DeepSpeed ZeRO-3: each parameter is a flat, padded partition (`ds_tensor`) of `ds_numel` elements.

    Rank r owns flat elements [r * n, (r + 1) * n) with n = ds_tensor.numel(); only the rows holding
    them are read. `assign(param, values)` receives them in fp32, zero-padded to n, and puts them
    where the caller wants (the partition, the fp32 master copy). Returns the elements this rank read.
    """
    params = list(model.named_parameters())
    with SafetensorsModel(path) as checkpoint:
        src = ModelWeights(checkpoint, extra)
        _check_names([n for n, _ in params], src)
        for name, p in params:
            _check_shape(name, tuple(p.ds_shape), src)
            n = p.ds_tensor.numel()
            start, end = rank * n, min((rank + 1) * n, p.ds_numel)
            values = torch.zeros(n, dtype=torch.float32)
            if end > start:
                values[: end - start] = src.read_flat(name, start, end).float()
            assign(p, values)
        return src.elements_read


@torch.no_grad()
def load_full_tensors_each(model: torch.nn.Module, path: Path | str,
                           assign: Callable[[str, torch.nn.Parameter, torch.Tensor], None],
                           extra: dict[str, torch.Tensor] | None = None) -> int:
    """Whole tensors one at a time (ZeRO-2 keeps whole parameters plus a sharded fp32 master copy)."""
    params = list(model.named_parameters())
    with SafetensorsModel(path) as checkpoint:
        src = ModelWeights(checkpoint, extra)
        _check_names([n for n, _ in params], src)
        for name, p in params:
            _check_shape(name, tuple(p.shape), src)
            assign(name, p, src.read(name))
        return src.elements_read


@torch.no_grad()
def load_full_tensors(model: torch.nn.Module, path: Path | str, extra: dict[str, torch.Tensor] | None = None) -> int:
    """Whole parameters (single, DDP, ZeRO-2), filled one tensor at a time straight into their device memory."""
    params = list(model.named_parameters())  # a tied weight appears once
    with SafetensorsModel(path) as checkpoint:
        src = ModelWeights(checkpoint, extra)
        _check_names([n for n, _ in params], src)
        for name, p in params:
            _check_shape(name, tuple(p.shape), src)
            p.copy_(src.read(name).to(device=p.device, dtype=p.dtype))
        return src.elements_read


@torch.no_grad()
def rebuild_buffers(model: torch.nn.Module) -> None:
    """`to_empty` leaves buffers uninitialised; recompute the non-persistent ones a checkpoint never holds.

    Rotary embeddings derive `inv_freq` from the config alone, so a fresh module built on the CPU gives
    the exact values the module would have had.
    """
    for module in model.modules():
        own = dict(module.named_buffers(recurse=False))
        if not own:
            continue
        config = getattr(module, "config", None)
        if config is None:
            raise RuntimeError(f"cannot rebuild the buffers {list(own)} of {type(module).__name__} after to_empty")
        with torch.device("cpu"):
            fresh = type(module)(config)
        for name, buf in own.items():
            buf.copy_(getattr(fresh, name).to(buf.device, buf.dtype))
