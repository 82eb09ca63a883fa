"""PyTorch FSDP2 (`fully_shard`): every decoder layer is one shard group, plus the root.

Parameters, gradients and optimizer state are DTensors sharded on dim 0 across the mesh (full
sharding), or sharded within a node and replicated across nodes (`backend.sharding=hybrid`,
HSDP on a 2-D mesh). Precision comes from `trainer.precision` alone:

- fp32:       fp32 weights, compute, gradient reduction and optimizer state;
- bf16_mixed: fp32 master weights and optimizer state; FSDP casts the gathered weights to bf16
              for compute and reduces gradients in fp32 (MixedPrecisionPolicy);
- bf16:       weights, gradients and optimizer state in bf16.

`backend.cpu_offload` keeps the sharded parameters, gradients and optimizer state on the CPU
(the optimizer steps there). Pretrained weights are loaded after sharding, each rank reading
only its own rows of the safetensors files, so no rank ever holds the whole model; the export
gathers one tensor at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from vicuna_exp.backends.base import OptimizerSpec
from vicuna_exp.backends.dcp_state import TorchOptimizerBackend
from vicuna_exp.choices import ModelInit, Precision, Sharding
from vicuna_exp.errors import UsageError
from vicuna_exp.model import ModelSpec


class FSDPBackend(TorchOptimizerBackend):
    name = "fsdp"
    averages_gradients = True

    def setup(self, spec: ModelSpec, optim: OptimizerSpec) -> torch.nn.Module:
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        from vicuna_exp.weights import load_dtensor_shards, rebuild_buffers

        offload = bool(self.cfg.backend.cpu_offload)
        home = torch.device("cpu") if offload else self.device
        if spec.init == ModelInit.pretrained:
            model = spec.build_meta()
        else:
            # Random init materialises the (small) model once, so it starts from exactly the
            # weights `single` draws from the same seed; fully_shard then keeps only the shard.
            model = spec.build(home)
        kwargs = {
            "mesh": self._mesh(),
            "mp_policy": self._mp_policy(),
            "offload_policy": CPUOffloadPolicy(pin_memory=self.device.type == "cuda") if offload else OffloadPolicy(),
            "reshard_after_forward": bool(self.cfg.backend.reshard_after_forward),
        }
        layers = [m for m in model.modules() if type(m).__name__ == spec.decoder_layer_class]
        if not layers:
            raise UsageError(f"backend=fsdp: the model has no {spec.decoder_layer_class} modules to shard")
        for layer in layers:
            fully_shard(layer, **kwargs)
        fully_shard(model, **{**kwargs, "reshard_after_forward": False})  # the root is needed again at once
        if spec.init == ModelInit.pretrained:
            model.to_empty(device=home)
            rebuild_buffers(model)
            self.elements_loaded = load_dtensor_shards(model, spec.path)
        self.model = self.module = model
        self.optimizer = optim.build_adamw(model)
        self.scheduler = optim.build_scheduler(self.optimizer)
        return model

    def _mesh(self) -> object:
        from torch.distributed.device_mesh import init_device_mesh

        world, local = self.dist.world_size, self.dist.local_world_size
        if self.cfg.backend.sharding == Sharding.full:
            return init_device_mesh(self.device.type, (world,), mesh_dim_names=("shard",))
        if world % local:
            raise UsageError(f"backend.sharding=hybrid: world size {world} is not a multiple of the "
                             f"{local} processes per node")
        return init_device_mesh(self.device.type, (world // local, local), mesh_dim_names=("replicate", "shard"))

    def _mp_policy(self) -> object:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if self.precision == Precision.bf16_mixed:
            return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        return MixedPrecisionPolicy()  # fp32, or bf16 weights that are already bf16

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the mixed-precision policy casts; autocast on top would double it

    @contextlib.contextmanager
    def accumulate(self, is_last: bool) -> Iterator[None]:
        # Reduce-scatter only after the last micro-batch; earlier ones accumulate unsharded grads locally.
        self.model.set_requires_gradient_sync(is_last)
        yield

    def export(self, out_dir: Path, dtype: torch.dtype) -> None:
        from vicuna_exp.export import export_module

        writer = export_module(self.model, self._gathered, out_dir, dtype, self.cfg, is_writer=self.dist.is_main)
        self.export_peak_bytes = writer.peak_bytes if writer is not None else 0
        self.log_facts(writer)

    def log_facts(self, writer: object | None) -> None:
        from vicuna_exp.backends.shard_facts import log_facts, optimizer_elements

        params = list(self.model.parameters())
        log_facts(backend="fsdp", rank=self.dist.rank, world_size=self.dist.world_size,
                  params_local=sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params),
                  params_total=sum(p.numel() for p in params), optim_local=optimizer_elements(self.optimizer),
                  elements_loaded=getattr(self, "elements_loaded", None),
                  export_peak_bytes=getattr(writer, "peak_bytes", None), export_bytes=getattr(writer, "total_bytes", None))

    def _gathered(self, names: set[str]) -> Iterator[tuple[str, torch.Tensor | None]]:
        """One full tensor at a time; every rank joins each all-gather, rank 0 keeps the result."""
        for name, p in self.model.named_parameters():
            if name not in names:
                continue
            full = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
            yield name, (full if self.dist.is_main else None)
            del full
