"""The one interface every backend implements, so the training loop never asks which one runs.

Contract the loop relies on:
- `setup` builds (or shards, then loads) the model and makes the optimizer and LR schedule;
  every rank calls it, with the same seed, and gets the module to call forward on (`model`);
  `module` is the Hugging Face model inside, whose submodules (the LM head) may be called too.
- `backward(loss)` leaves gradients equal to the SUM over ranks of d(loss)/d(theta). The loop
  already divides each rank's summed token loss by the supervised-token count of the whole
  global batch, so a backend that averages over ranks must scale by the world size (and a
  backend that divides by accumulation steps must undo that).
- `accumulate(is_last)` wraps one micro-batch's forward and backward; gradient reduction
  across ranks may be skipped until `is_last`.
- `step()` clips, steps the optimizer and the schedule, zeroes gradients and returns the
  global gradient norm before clipping.
- `save`/`load` write or read the model, optimizer and schedule state in a directory (sharded
  where the backend shards); every rank calls them. The checkpoint manager owns the directory
  life cycle (temporary name, atomic rename, pruning).
- `export` writes one Hugging Face model (safetensors) from the training state, without any
  rank holding the whole unsharded model when the backend shards; with adapters, the merged
  model, after `export_adapter` wrote the adapter alone.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from vicuna_exp.choices import Precision, Schedule
from vicuna_exp.distributed import DistInfo
from vicuna_exp.model import ModelSpec


@dataclass
class OptimizerSpec:
    """AdamW hyper-parameters and the LR multiplier per step, identical for every backend."""

    lr: float
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    fused: bool
    lr_lambda: Callable[[int], float]

    def param_groups(self, model: torch.nn.Module) -> list[dict]:
        """No weight decay on norms and biases (1-D tensors); matters only when weight_decay > 0.
        A group left empty (adapters alone: all matrices) is not made."""
        decay, no_decay = [], []
        for p in model.parameters():
            if p.requires_grad:
                # ZeRO-3 partitions are flat: ds_shape keeps the parameter's real shape
                (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # LoRA trains matrices alone: ZeRO drops an empty group, and the schedule must see the same groups
        return [g for g in groups if g["params"]]

    def build_adamw(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        kwargs = {"fused": True} if self.fused else {}
        return torch.optim.AdamW(self.param_groups(model), lr=self.lr, betas=self.betas, eps=self.eps, **kwargs)

    def build_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_lambda)


def lr_multiplier(schedule: Schedule, *, total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warmup from 0, then cosine / linear decay to `min_ratio`, or constant.

    The multipliers equal the Hugging Face Trainer's (`get_cosine_schedule_with_warmup`,
    `get_linear_schedule_with_warmup`, `get_constant_schedule_with_warmup`; with `min_ratio` > 0,
    `get_cosine_with_min_lr_schedule_with_warmup`) step for step, since the published recipe ran
    through them: update k (0-based) warms up at k / warmup, so the first update runs at lr 0.
    LambdaLR calls it with the number of scheduler steps taken so far.
    """

    def f(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if schedule == Schedule.constant:
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == Schedule.cosine else 1.0 - progress
        return max(0.0, min_ratio + (1.0 - min_ratio) * decay)

    return f


class Backend(ABC):
    name: str = "base"

    def __init__(self, cfg: DictConfig, dist: DistInfo, device: torch.device, precision: Precision) -> None:
        self.cfg = cfg
        self.dist = dist
        self.device = device
        self.precision = precision  # fp32 | bf16_mixed | bf16 (resolved, never auto)
        self.model: torch.nn.Module | None = None  # what forward is called on (a wrapper, an engine)
        self.module: torch.nn.Module | None = None  # the Hugging Face model inside it (its head, its config)

    @abstractmethod
    def setup(self, spec: ModelSpec, optim: OptimizerSpec) -> torch.nn.Module: ...

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 compute over fp32 weights where the backend does not cast itself."""
        if self.precision == Precision.bf16_mixed:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def accumulate(self, is_last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def step(self) -> float: ...

    @abstractmethod
    def current_lr(self) -> float: ...

    @abstractmethod
    def save(self, ckpt_dir: Path) -> None: ...

    @abstractmethod
    def load(self, ckpt_dir: Path) -> None: ...

    @abstractmethod
    def export(self, out_dir: Path, dtype: torch.dtype) -> None: ...

    def export_adapter(self, out_dir: Path) -> None:
        """Write the trained adapter alone (peft's layout) for an adapter method; every rank calls it."""
        raise NotImplementedError(f"backend {self.name} does not train adapters")

    def zero_grad(self) -> None:
        """Drop partial gradients of an abandoned step (a preemption inside a step)."""
        assert self.model is not None
        self.model.zero_grad(set_to_none=True)

    def train(self, mode: bool = True) -> None:
        assert self.model is not None
        self.model.train(mode)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        self.train(False)
        try:
            with torch.no_grad():
                yield
        finally:
            self.train(True)

    def state_bytes(self) -> dict[str, int]:
        """Bytes of parameters, gradients and optimizer state this rank holds (for plan checks)."""
        return {"params": 0, "grads": 0, "optim": 0}

    def held_grad_bytes(self) -> int:
        """Bytes of gradient storage this rank holds now: every parameter's `.grad` plus the
        backend's own accumulators and buckets, each storage counted once. Read between
        micro-batches, it is what gradient accumulation costs (the planner's gradient term)."""
        assert self.model is not None
        return storage_bytes(p.grad for p in self.model.parameters())

    def close(self) -> None:
        """Release backend resources; the process group itself is the worker's to destroy."""
        return None


def tensor_bytes(tensors: Iterator[torch.Tensor]) -> int:
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def storage_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind `tensors` (a DTensor's local shard; views of one
    flat buffer count once, as the buffer)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        storage = local.untyped_storage()
        if storage.nbytes():
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
