"""DistributedDataParallel: a whole replica per rank, gradients all-reduced after the last micro-batch.

The baseline a sharding backend must beat on memory: every rank holds all parameters, gradients
and optimizer state. Pretrained weights go straight from the safetensors files into each rank's
device memory, one tensor at a time (no second full copy in host memory). Checkpoints use the
same torch.distributed.checkpoint layout as `single` and `fsdp`, so any of the three resumes any other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from vicuna_exp.backends.base import OptimizerSpec
from vicuna_exp.backends.dcp_state import TorchOptimizerBackend
from vicuna_exp.choices import ModelInit
from vicuna_exp.model import ModelSpec


class DDPBackend(TorchOptimizerBackend):
    name = "ddp"
    averages_gradients = True

    def setup(self, spec: ModelSpec, optim: OptimizerSpec) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        from vicuna_exp.weights import load_full_tensors, rebuild_buffers

        if spec.init == ModelInit.pretrained and not spec.quantized:  # qlora: quantised as read, in build()
            module = spec.build_meta()
            module.to_empty(device=self.device)
            rebuild_buffers(module)
            self.elements_loaded = load_full_tensors(module, spec.path)
            module = spec.adapt(module)  # adapters on the loaded base (build() adds them itself)
        else:
            module = spec.build(self.device)
        self.module = module
        ids = [self.device.index] if self.device.type == "cuda" else None
        self.model = DistributedDataParallel(module, device_ids=ids, bucket_cap_mb=int(self.cfg.backend.bucket_size_mb))
        self.optimizer = optim.build_adamw(module)
        self.scheduler = optim.build_scheduler(self.optimizer)
        return self.model

    @contextlib.contextmanager
    def accumulate(self, is_last: bool) -> Iterator[None]:
        with contextlib.nullcontext() if is_last else self.model.no_sync():
            yield

    def export(self, out_dir: Path, dtype: torch.dtype) -> None:
        from vicuna_exp.export import export_whole

        if not self.dist.is_main:  # every replica is the same; no collective needed
            self.log_facts(None)
            return
        writer = export_whole(self.module, out_dir, dtype, self.cfg)  # adapters folded in (the last use of the model)
        self.export_peak_bytes = writer.peak_bytes if writer is not None else 0
        self.log_facts(writer)

    def log_facts(self, writer: object | None) -> None:
        from vicuna_exp.backends.shard_facts import log_facts, optimizer_elements

        n = sum(p.numel() for p in self.module.parameters())
        log_facts(backend="ddp", rank=self.dist.rank, world_size=self.dist.world_size, params_local=n, params_total=n,
                  optim_local=optimizer_elements(self.optimizer), elements_loaded=getattr(self, "elements_loaded", None),
                  export_peak_bytes=getattr(writer, "peak_bytes", None), export_bytes=getattr(writer, "total_bytes", None))
