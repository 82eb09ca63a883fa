"""Sharding backends behind one interface (`base.Backend`); `create` picks one from the config."""

from __future__ import annotations

import importlib

from omegaconf import DictConfig

from vicuna_exp.backends.base import Backend, OptimizerSpec, lr_multiplier
from vicuna_exp.choices import BackendName

# backend.name -> "module:class"; modules are imported only when chosen.
REGISTRY: dict[BackendName, str] = {
    BackendName.single: "vicuna_exp.backends.single:SingleBackend",
    BackendName.ddp: "vicuna_exp.backends.ddp:DDPBackend",
    BackendName.fsdp: "vicuna_exp.backends.fsdp:FSDPBackend",
    BackendName.deepspeed: "vicuna_exp.backends.deepspeed:DeepSpeedBackend",
}


def backend_class(cfg: DictConfig) -> type[Backend]:
    """The class of `backend.name` (an Enum the schema checked, so every value is here)."""
    module, _, cls = REGISTRY[BackendName(cfg.backend.name)].partition(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["Backend", "OptimizerSpec", "REGISTRY", "backend_class", "lr_multiplier"]
