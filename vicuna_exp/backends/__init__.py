"""Sharding backends behind one interface (`base.Backend`); `create` picks one from the config."""

from __future__ import annotations

import importlib

from omegaconf import DictConfig

from vicuna_exp.backends.base import Backend, OptimizerSpec, lr_multiplier
from vicuna_exp.errors import UsageError

# backend.name -> "module:class"; modules are imported only when chosen.
REGISTRY = {
    "single": "vicuna_exp.backends.single:SingleBackend",
    "ddp": "vicuna_exp.backends.ddp:DDPBackend",
    "fsdp": "vicuna_exp.backends.fsdp:FSDPBackend",
    "deepspeed": "vicuna_exp.backends.deepspeed:DeepSpeedBackend",
}


def backend_class(cfg: DictConfig) -> type[Backend]:
    target = REGISTRY.get(cfg.backend.name)
    if target is None:
        raise UsageError(f"backend.name={cfg.backend.name!r}: choose one of {', '.join(REGISTRY)}")
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["Backend", "OptimizerSpec", "REGISTRY", "backend_class", "lr_multiplier"]
