"""PyTorch FSDP2 (`fully_shard`): every decoder layer is one shard group, plus the root. The decoder
layer is whatever class the model's own `_no_split_modules` names, so every family shards the same way.

Parameters, gradients and optimizer state are DTensors sharded on dim 0 across the mesh (full
sharding), or sharded within a node and replicated across nodes (`backend.sharding=hybrid`,
HSDP on a 2-D mesh). Precision comes from `trainer.precision` alone:

- fp32:       fp32 weights, compute, gradient reduction and optimizer state;
- bf16_mixed: fp32 master weights and optimizer state; FSDP casts the gathered weights to bf16
              for compute and reduces gradients in fp32 (MixedPrecisionPolicy);
- bf16:       weights, gradients and optimizer state in bf16.

`backend.reduce_every_micro_batch` (default true) reduce-scatters each micro-batch's gradients
into the shards, trading a reduce-scatter per micro-batch for memory; false reduces once per step
and holds the whole model's unsharded gradients between micro-batches.

`backend.cpu_offload` keeps the sharded parameters, gradients and optimizer state on the CPU
(the optimizer steps there). Pretrained weights are loaded after sharding, each rank reading
only its own rows of the safetensors files, so no rank ever holds the whole model; the export
gathers one tensor at a time.

An adapter method (`finetune=lora`) adds peft's adapters on the meta device before sharding: a
decoder layer's unit then holds its frozen base weights and its adapters together (FSDP2 reduces
gradients only for those that require them). After `to_empty` the base is read from model.path
and the adapters take their initial values (`finetune.initial_adapters`), the ones `single` draws.
The checkpoints hold the adapters' shards alone; the merged export folds each layer's adapters
into its gathered weights one layer at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from vicuna_exp.backends.base import OptimizerSpec, storage_bytes
from vicuna_exp.backends.dcp_state import TorchOptimizerBackend
from vicuna_exp.choices import ModelInit, Precision
from vicuna_exp.finetune import initial_adapters, is_peft_model, save_adapter
from vicuna_exp.mesh import mesh_shape
from vicuna_exp.model import ModelSpec, decoder_layers


class FSDPBackend(TorchOptimizerBackend):
    name = "fsdp"
    averages_gradients = True

    def setup(self, spec: ModelSpec, optim: OptimizerSpec) -> torch.nn.Module:
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        from vicuna_exp.weights import load_dtensor_shards, rebuild_buffers

        offload = bool(self.cfg.backend.cpu_offload)
        home = torch.device("cpu") if offload else self.device
        if spec.init == ModelInit.pretrained:
            model = spec.adapt(spec.build_meta())  # adapters, if any, are placeholders until filled below
        else:
            # Random init materialises the (small) model once, so it starts from exactly the
            # weights `single` draws from the same seed; fully_shard then keeps only the shard.
            model = spec.build(home)
        kwargs = {
            "mesh": self._mesh(),
            "mp_policy": self._mp_policy(is_peft_model(model)),
            "offload_policy": CPUOffloadPolicy(pin_memory=self.device.type == "cuda") if offload else OffloadPolicy(),
            "reshard_after_forward": bool(self.cfg.backend.reshard_after_forward),
        }
        for layer in decoder_layers(model, "backend=fsdp"):  # the classes of the model's _no_split_modules
            fully_shard(layer, **kwargs)
        fully_shard(model, **{**kwargs, "reshard_after_forward": False})  # the root is needed again at once
        if spec.init == ModelInit.pretrained:
            model.to_empty(device=home)
            rebuild_buffers(model)
            self.elements_loaded = load_dtensor_shards(model, spec.path, initial_adapters(model, spec.seed))
        self.model = self.module = model
        self.optimizer = optim.build_adamw(model)
        self.scheduler = optim.build_scheduler(self.optimizer)
        return model

    def _mesh(self) -> object:
        from torch.distributed.device_mesh import init_device_mesh

        shape = mesh_shape(self.cfg.backend.sharding, self.dist.world_size, self.dist.local_world_size)
        names = ("shard",) if len(shape) == 1 else ("replicate", "shard")
        return init_device_mesh(self.device.type, shape, mesh_dim_names=names)

    def _mp_policy(self, adapters: bool) -> object:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if self.precision == Precision.bf16_mixed:
            return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if self.precision == Precision.bf16 and adapters:
            # fp32 adapters beside a bf16 base: one unit gathers one dtype, so compute in bf16
            return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        return MixedPrecisionPolicy()  # fp32, or bf16 weights that are already bf16

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the mixed-precision policy casts; autocast on top would double it

    @contextlib.contextmanager
    def accumulate(self, is_last: bool) -> Iterator[None]:
        if self.cfg.backend.reduce_every_micro_batch:
            # Reduce-scatter every micro-batch into the sharded gradients, so no rank holds more
            # than one layer's unsharded gradients; under HSDP the all-reduce across replicas waits
            # for the last one (FSDP2 adds the earlier shards up in its partial reduce output).
            self.model.set_requires_gradient_sync(True)
            self.model.set_requires_all_reduce(is_last)
        else:
            # Communicate once per step: earlier micro-batches leave every parameter's unsharded
            # gradient on each rank (the whole model's, in the reduce dtype) until the last one.
            self.model.set_requires_gradient_sync(is_last)
        yield

    def held_grad_bytes(self) -> int:
        """Sharded `.grad`s plus FSDP2's own gradient storage: each parameter's unsharded gradient
        (`_unsharded_param.grad`, or `unsharded_accumulated_grad` in the reduce dtype) while no
        reduce-scatter has taken it, HSDP's partial reduce output awaiting the all-reduce, and
        retained reduce-scatter inputs. These are FSDP2 internals (torch 2.13), read, never changed."""
        found: list[torch.Tensor | None] = [p.grad for p in self.model.parameters()]
        for module in self.model.modules():
            if not hasattr(module, "_get_fsdp_state"):
                continue
            state = module._get_fsdp_state()
            found += [rs.reduce_scatter_input for rs in getattr(state._comm_ctx, "reduce_scatter_states", [])]
            for group in state._fsdp_param_groups:
                found.append(group._partial_reduce_output)
                for fp in group.fsdp_params:
                    found.append(fp.unsharded_accumulated_grad)
                    unsharded = getattr(fp, "_unsharded_param", None)
                    found.append(unsharded.grad if unsharded is not None else None)
        return storage_bytes(found)

    def export(self, out_dir: Path, dtype: torch.dtype) -> None:
        from vicuna_exp.export import export_module

        writer = export_module(self.model, self._gathered, out_dir, dtype, self.cfg, is_writer=self.dist.is_main,
                               gather=self._full)
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

    def export_adapter(self, out_dir: Path) -> None:
        """The adapters gathered whole (small), written by rank 0; every rank joins the gathers."""
        state = {n: self._full(p) for n, p in self.model.named_parameters() if p.requires_grad}
        if self.dist.is_main:
            save_adapter(self.model, out_dir, self.cfg.model.path, state)

    def _full(self, p: torch.nn.Parameter) -> torch.Tensor | None:
        """One parameter whole on rank 0 (None elsewhere); an all-gather every rank joins."""
        full = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
        return full.detach() if self.dist.is_main else None

    def _gathered(self, names: set[str]) -> Iterator[tuple[str, torch.Tensor | None]]:
        """One full tensor at a time; every rank joins each all-gather, rank 0 keeps the result."""
        for name, p in self.model.named_parameters():
            if name in names:
                yield name, self._full(p)
