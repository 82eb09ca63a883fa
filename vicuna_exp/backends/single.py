"""One process, one device: the reference every sharded backend is compared against."""

from __future__ import annotations

from pathlib import Path

import torch

from vicuna_exp.backends.base import OptimizerSpec
from vicuna_exp.backends.dcp_state import TorchOptimizerBackend
from vicuna_exp.model import ModelSpec


class SingleBackend(TorchOptimizerBackend):
    name = "single"

    def setup(self, spec: ModelSpec, optim: OptimizerSpec) -> torch.nn.Module:
        self.model = self.module = spec.build(self.device)
        self.optimizer = optim.build_adamw(self.model)
        self.scheduler = optim.build_scheduler(self.optimizer)
        return self.model

    def export(self, out_dir: Path, dtype: torch.dtype) -> None:
        """The same writer as the sharded backends, so every backend's `final/` is laid out alike."""
        from vicuna_exp.export import export_whole

        export_whole(self.module, out_dir, dtype, self.cfg)  # adapters folded in (the last use of the model)
