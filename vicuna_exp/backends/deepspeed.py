"""DeepSpeed ZeRO-2 / ZeRO-3 through `deepspeed.initialize`, with a config generated from ours.

The DeepSpeed config is built from the Hydra values every run (micro-batch, accumulation,
clipping, precision, stage, offload), never kept as a JSON file that could drift from them.
The optimizer is the same AdamW as every other backend (torch's, or DeepSpeedCPUAdam in AdamW
mode when the optimizer state is offloaded), and the LR schedule is ours, stepped by us.

- ZeRO-2: whole parameters on every rank; gradients and the fp32 optimizer state sharded.
- ZeRO-3: parameters sharded too (flat partitions, `ds_tensor`), gathered layer by layer.
- Precision: fp32 = DeepSpeed without bf16; bf16_mixed = bf16 weights for compute with fp32
  master weights and optimizer state, gradients communicated in fp32; bf16 = bf16 master
  weights and optimizer state as well.

An adapter method (`finetune=lora`) adds peft's adapters to the base as DeepSpeed holds it (ZeRO-3:
partitioned as built; ZeRO-2: on the meta device until allocated), fills them with their initial
values (`finetune.initial_adapters`) beside the pretrained base, and gives the optimizer the
adapters alone: frozen parameters get no fp32 master copy, and checkpoints leave them out
(`exclude_frozen_parameters`); the base is rebuilt from model.path on resume.

Checkpoints are DeepSpeed's own (`<ckpt>/deepspeed/`). Resuming on a different number of
ranks converts the checkpoint once to DeepSpeed's universal format (`<ckpt>/deepspeed_universal_from_<N>/`)
and loads that, since ZeRO's partitions depend on the world size.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from vicuna_exp import distributed as D
from vicuna_exp.backends.base import Backend, OptimizerSpec, storage_bytes, tensor_bytes
from vicuna_exp.checkpoint import DCP_SUBDIR, DEEPSPEED_SUBDIR
from vicuna_exp.choices import ModelInit, Precision
from vicuna_exp.config import rows_per_rank, world_size
from vicuna_exp.distributed import free_port
from vicuna_exp.errors import UsageError
from vicuna_exp.finetune import initial_adapters, is_peft_model, save_adapter
from vicuna_exp.model import ModelSpec

log = logging.getLogger(__name__)
UNIVERSAL_DONE = ".complete"


def deepspeed_config(cfg: DictConfig, precision: str, *, pin_memory: bool = False) -> dict[str, Any]:
    """The `deepspeed.initialize` config for this run; every value traces back to a Hydra key."""
    b, t = cfg.backend, cfg.trainer
    stage = int(b.zero_stage)
    if stage not in (2, 3):
        raise UsageError(f"backend.zero_stage={stage}: choose 2 or 3")
    if b.offload_params and stage != 3:
        raise UsageError("backend.offload_params=true needs backend.zero_stage=3 (ZeRO-2 does not partition parameters)")
    bucket = int(b.bucket_size_mb) * 2**20 // 4  # DeepSpeed counts bucket sizes in elements
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": bool(b.overlap_comm), "contiguous_gradients": True,
                            "reduce_bucket_size": bucket}
    if stage == 2:
        zero["allgather_bucket_size"] = bucket
    else:
        zero["stage3_prefetch_bucket_size"] = bucket
    if b.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin_memory}
    if b.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin_memory}
    micro, gas = declared_batch_split(rows_per_rank(cfg), int(t.micro_batch_size))
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "train_batch_size": micro * gas * world_size(cfg),  # = global_batch_size: what is trained
        "gradient_clipping": float(t.grad_clip),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch's AdamW, the same optimizer as the other backends
        "steps_per_print": 2**31 - 1,  # our tracker logs
        "wall_clock_breakdown": False,
    }
    if precision == Precision.fp32:
        ds["bf16"] = {"enabled": False}
    elif precision == Precision.bf16_mixed:
        # No step skipping on overflow (bf16 has fp32's range; FSDP never skips), fp32 gradient reduction.
        ds["bf16"] = {"enabled": True, "check_grad_overflow": False}
        ds["communication_data_type"] = "fp32"
    elif precision == Precision.bf16:
        ds["bf16"] = {"enabled": True, "check_grad_overflow": False,
                      "bf16_master_weights_and_grads": True, "bf16_optimizer_states": True}
    else:
        raise UsageError(f"trainer.precision={precision}: the deepspeed backend takes fp32, bf16_mixed or bf16")
    return ds


def declared_batch_split(rows: int, cap: int) -> tuple[int, int]:
    """(micro-batch, accumulation steps) to declare to DeepSpeed for `rows` per rank under `cap`.

    DeepSpeed insists that train_batch_size = micro x accumulation x world, with integers. Our loop
    cuts the rows into ceil(rows / cap) micro-batches, the last one smaller when the division is
    uneven, which no such product describes. The declared pair only feeds DeepSpeed's bookkeeping:
    we set the accumulation boundary ourselves and scale the loss ourselves (`scale_wrt_gas=False`).
    So we declare the largest divisor of `rows` within the cap: the product is exactly the rows
    trained, the declared accumulation equals ours whenever the cap divides the rows, and it is > 1
    exactly when ours is (ZeRO's offloaded gradients take a separate accumulation path then).
    """
    micro = max(d for d in range(1, min(cap, rows) + 1) if rows % d == 0)
    return micro, rows // micro


class DeepSpeedBackend(Backend):
    name = "deepspeed"

    def setup(self, spec: ModelSpec, optim: OptimizerSpec) -> torch.nn.Module:
        from vicuna_exp.backends.build_ops import use_extensions_dir

        use_extensions_dir()
        quiet_deepspeed()
        import deepspeed

        self._init_comm()
        self.stage = int(self.cfg.backend.zero_stage)
        self.ds_config = deepspeed_config(self.cfg, self.precision, pin_memory=self.device.type == "cuda")
        model = self._build(spec)
        base = self._optimizer(model, optim)
        self.scheduler = optim.build_scheduler(base)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=base, config=self.ds_config)
        self.engine = engine
        self.module = engine.module
        self.model = engine
        self.adapters = is_peft_model(self.module)
        if spec.init == ModelInit.pretrained:
            self.elements_loaded = self._load_pretrained(spec.path, initial_adapters(self.module, spec.seed))
        return engine

    def _init_comm(self) -> None:
        """deepspeed.comm wraps the process group the worker made; one process gets a group of one."""
        import deepspeed
        import torch.distributed as dist

        if not dist.is_initialized():
            for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1"),
                               ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port()))):
                os.environ.setdefault(key, value)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)

    def _build(self, spec: ModelSpec) -> torch.nn.Module:
        import deepspeed
        from transformers import AutoModelForCausalLM
        from transformers.initialization import no_init_weights

        from vicuna_exp.weights import rebuild_buffers

        if spec.init == ModelInit.random:
            # The same draw from the same seed as `single`; ZeRO-3 partitions it in initialize.
            return spec.build(self.device)
        if self.stage == 3:
            # Partitioned as each submodule is built: no rank ever holds the whole model.
            device = "cpu" if self.cfg.backend.offload_params else None
            # No random init of the partitions (the checkpoint overwrites them, and HF's init of the
            # padding row indexes into a partition that may be empty).
            with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=self.ds_config, remote_device=device):
                model = AutoModelForCausalLM.from_config(spec.hf_config, dtype=spec.param_dtype)
            # Adapters built outside zero.Init (small, whole); initialize partitions them like the rest.
            return spec.adapt(spec.finish(model))
        model = spec.adapt(spec.build_meta())  # ZeRO-2 keeps whole parameters: allocate, then fill one by one
        model.to_empty(device=self.device)
        rebuild_buffers(model)
        return model

    def _optimizer(self, model: torch.nn.Module, optim: OptimizerSpec) -> torch.optim.Optimizer:
        if not self.cfg.backend.offload_optimizer:
            return optim.build_adamw(model)
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(optim.param_groups(model), lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                adamw_mode=True)

    @torch.no_grad()
    def _load_pretrained(self, path: Path | None, adapters: dict[str, torch.Tensor]) -> int:
        """Fill both the compute weights and the fp32 master copy from the checkpoint (the adapters
        from their initial values), exactly; a frozen parameter has no master copy.

        After `initialize` the optimizer owns a separate (fp32) master copy; loading before it
        would round the master weights through bf16 when precision is bf16_mixed.
        """
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param

        from vicuna_exp.weights import load_full_tensors_each, load_zero3_partitions

        assert path is not None
        if self.stage == 3:
            def assign3(p: torch.nn.Parameter, values: torch.Tensor) -> None:
                p.ds_tensor.copy_(values.to(p.ds_tensor.device, p.ds_tensor.dtype))
                if p.requires_grad:
                    safe_set_local_fp32_param(p, values.to(self.device))

            return load_zero3_partitions(self.module, path, self.dist.rank, assign3, adapters)

        def assign2(name: str, p: torch.nn.Parameter, full: torch.Tensor) -> None:
            p.copy_(full.to(p.device, p.dtype))
            if p.requires_grad:
                safe_set_full_fp32_param(p, full.to(self.device, torch.float32))

        return load_full_tensors_each(self.module, path, assign2, adapters)

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the engine holds bf16 weights itself when precision asks for them

    @contextlib.contextmanager
    def accumulate(self, is_last: bool) -> Iterator[None]:
        # We own the boundary: one engine.step() per optimizer step, after the last micro-batch.
        self.engine.set_gradient_accumulation_boundary(is_last)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        # The engine averages over ranks (undone by the world size) and would divide by the
        # accumulation steps (turned off): the loop has already normalised by supervised tokens.
        self.engine.backward(loss * self.dist.world_size, scale_wrt_gas=False)

    def step(self) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        self.scheduler.step()
        return float(norm) if norm is not None else float("nan")

    def current_lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def zero_grad(self) -> None:
        self.engine.optimizer.zero_grad(set_to_none=True)

    # ---- checkpoints -------------------------------------------------------------------------
    def save(self, ckpt_dir: Path) -> None:
        client = {"scheduler": self.scheduler.state_dict(), "world_size": self.dist.world_size}
        self.engine.save_checkpoint(str(ckpt_dir), tag=DEEPSPEED_SUBDIR, client_state=client, save_latest=False,
                                    exclude_frozen_parameters=self.adapters)  # the base is rebuilt from model.path

    def load(self, ckpt_dir: Path) -> None:
        if not (ckpt_dir / DEEPSPEED_SUBDIR).is_dir() and (ckpt_dir / DCP_SUBDIR).is_dir():
            raise RuntimeError(f"{ckpt_dir} was written by the {DCP_SUBDIR!r} layout of single/ddp/fsdp: resume it with "
                               "one of those backends (DeepSpeed cannot read torch.distributed.checkpoint)")
        saved = saved_world_size(ckpt_dir / DEEPSPEED_SUBDIR)
        tag = DEEPSPEED_SUBDIR
        universal = saved != self.dist.world_size
        if universal:
            tag = self._universal(ckpt_dir, saved)
        else:
            self._agree_readable(ckpt_dir / DEEPSPEED_SUBDIR)
        self.engine._config.load_universal_checkpoint = universal  # read at load time only
        try:
            path, client = self.engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                                       load_lr_scheduler_states=False,
                                                       load_module_strict=not self.adapters)  # no frozen base saved
        finally:
            self.engine._config.load_universal_checkpoint = False
        if path is None or not client or "scheduler" not in client:
            raise RuntimeError(f"{ckpt_dir / tag}: DeepSpeed found no complete checkpoint there")
        self._unshare_step_counters()
        self.scheduler.load_state_dict(client["scheduler"])

    def _agree_readable(self, ds_dir: Path) -> None:
        """Every rank opens its own files first and all agree: a rank failing alone inside
        load_checkpoint would leave the others waiting in a collective (a hang, not a fallback)."""
        r = self.dist.rank
        model_file = f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" if self.stage == 3 else "mp_rank_00_model_states.pt"
        error = None
        for name in (model_file, f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"):
            try:
                torch.load(ds_dir / name, map_location="cpu", mmap=True, weights_only=False)
            except Exception as e:  # noqa: BLE001 - any unreadable file makes the checkpoint unusable
                error = f"{ds_dir / name}: {type(e).__name__}: {e}"
                break
        bad = D.all_reduce(torch.tensor([0.0 if error is None else 1.0]), op="max")
        if bad.item():
            raise RuntimeError(error or f"{ds_dir}: another rank cannot read its part of this checkpoint")

    def _unshare_step_counters(self) -> None:
        """ZeRO-3's universal loader gives every parameter group the same `step` tensor; AdamW
        increments it in place, so with two groups (decay / no decay) it would advance twice per step
        and skew Adam's bias correction. Give each group its own copy."""
        for state in self._base_optimizer().state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    def _universal(self, ckpt_dir: Path, saved: int) -> str:
        """Rank 0 converts once (kept beside the original), the others wait; returns the tag to load."""
        tag = f"{DEEPSPEED_SUBDIR}_universal_from_{saved}"
        out = ckpt_dir / tag
        error = None
        if self.dist.is_main and not (out / UNIVERSAL_DONE).is_file():
            log.warning("%s was written by %d ranks, this run has %d: converting it to DeepSpeed's universal "
                        "format in %s", ckpt_dir, saved, self.dist.world_size, out)
            try:
                convert_to_universal(ckpt_dir / DEEPSPEED_SUBDIR, out)
            except Exception as e:  # noqa: BLE001 - reported on every rank below
                error = f"{type(e).__name__}: {e}"
        error = D.broadcast_object(error)
        if error:
            raise RuntimeError(f"cannot resume {ckpt_dir} (saved by {saved} ranks) on {self.dist.world_size} "
                               f"ranks: conversion to DeepSpeed's universal checkpoint failed: {error}")
        return tag

    # ---- export --------------------------------------------------------------------------------
    def export(self, out_dir: Path, dtype: torch.dtype) -> None:
        from vicuna_exp.export import export_module

        writer = export_module(self.module, self._gathered, out_dir, dtype, self.cfg, is_writer=self.dist.is_main,
                               gather=self._full)
        self.export_peak_bytes = writer.peak_bytes if writer is not None else 0
        self.log_facts(writer)

    def log_facts(self, writer: object | None) -> None:
        from vicuna_exp.backends.shard_facts import log_facts, optimizer_elements

        params = list(self.module.parameters())
        log_facts(backend=f"deepspeed_zero{self.stage}", rank=self.dist.rank, world_size=self.dist.world_size,
                  params_local=sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params),
                  params_total=sum(getattr(p, "ds_numel", p.numel()) for p in params),
                  optim_local=optimizer_elements(self._base_optimizer()),
                  elements_loaded=getattr(self, "elements_loaded", None),
                  export_peak_bytes=getattr(writer, "peak_bytes", None), export_bytes=getattr(writer, "total_bytes", None))

    def _base_optimizer(self) -> torch.optim.Optimizer:
        zero = self.engine.optimizer
        return zero.optimizer if hasattr(zero, "optimizer") else zero

    def export_adapter(self, out_dir: Path) -> None:
        """The adapters' fp32 masters gathered whole (small), written by rank 0; every rank joins."""
        state = {n: self._full(p) for n, p in self.module.named_parameters() if p.requires_grad}
        if self.dist.is_main:
            save_adapter(self.module, out_dir, self.cfg.model.path, state)

    def _full(self, p: torch.nn.Parameter) -> torch.Tensor | None:
        """One parameter whole on rank 0 (None elsewhere), a collective every rank joins: the fp32
        master of a trainable one, the module's own value of a frozen one (it has no master)."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        if p.requires_grad:
            full = safe_get_full_fp32_param(p)
        elif hasattr(p, "ds_id"):  # ZeRO-3: gather the partitions for a moment
            with deepspeed.zero.GatheredParameters([p]):
                full = p.detach().clone()
        else:
            full = p.detach()
        return full.detach().cpu() if self.dist.is_main else None

    def _gathered(self, names: set[str]) -> Iterator[tuple[str, torch.Tensor | None]]:
        """The fp32 master value of one parameter at a time (a collective: every rank joins)."""
        for name, p in self.module.named_parameters():
            if name in names:
                yield name, self._full(p)

    def state_bytes(self) -> dict[str, int]:
        params = [getattr(p, "ds_tensor", p) for p in self.module.parameters()]
        base = self._base_optimizer()
        optim = [v for s in base.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim > 0]
        return {"params": tensor_bytes(iter(params)), "grads": 0, "optim": tensor_bytes(iter(optim))}

    def held_grad_bytes(self) -> int:
        """Module and master-partition `.grad`s plus ZeRO's own gradient storage, found by attribute
        name on its optimizer: the reduce buckets (`ipg_*`) and the partitions it accumulates
        into (ZeRO-2 `grads_in_partition` / `averaged_gradients`, ZeRO-3
        `grad_partitions_flat_buffer`). Read, never changed."""
        zero = self.engine.optimizer
        found: list[torch.Tensor | None] = [p.grad for p in self.module.parameters()]
        found += [p.grad for g in self._base_optimizer().param_groups for p in g["params"]]
        for name, value in vars(zero).items():
            if "grad" in name.lower() or "ipg" in name.lower():
                found += _tensors_in(value)
        return storage_bytes(found)

    def close(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None and hasattr(engine, "destroy"):
            engine.destroy()


def _tensors_in(value: Any, depth: int = 3) -> list[torch.Tensor]:
    """The tensors in a value of nested lists, tuples and dicts (ZeRO keeps its buffers so)."""
    if torch.is_tensor(value):
        return [value]
    if depth == 0:
        return []
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    return [t for item in items for t in _tensors_in(item, depth - 1)]


def saved_world_size(ds_dir: Path) -> int:
    """ZeRO writes one optimizer-state file per data-parallel rank."""
    files = list(ds_dir.glob("*_optim_states.pt"))
    if not files:
        raise RuntimeError(f"{ds_dir}: no ZeRO optimizer-state files (incomplete or not a DeepSpeed checkpoint)")
    return len(files)


def convert_to_universal(ds_dir: Path, out: Path) -> None:
    """DeepSpeed's ds_to_universal, in-process; the marker file is written last."""
    import argparse
    import shutil

    from deepspeed.checkpoint import ds_to_universal

    if out.exists():
        shutil.rmtree(out)
    args = argparse.Namespace(input_folder=str(ds_dir), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    ds_to_universal.main(args)
    (out / UNIVERSAL_DONE).write_text("ok\n")


def quiet_deepspeed() -> None:
    """DeepSpeed logs every config value at INFO and torch warns on each deprecated collective it calls."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor).*")
