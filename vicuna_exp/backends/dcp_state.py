"""What single, DDP and FSDP share: a plain torch AdamW and LR schedule, and their state in one
torch.distributed.checkpoint layout, `state/` (keyed by parameter name, so any of them can resume
any other, on any number of ranks: DCP reshards on load) and `scheduler.pt`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from vicuna_exp.backends.base import Backend, tensor_bytes
from vicuna_exp.checkpoint import DCP_SUBDIR, DEEPSPEED_SUBDIR

SCHEDULER_FILE = "scheduler.pt"


def _options(model: torch.nn.Module) -> object:
    """A frozen base (an adapter method) stays out of the checkpoint: it is rebuilt from model.path
    (or the seed), so only the parameters that train, their optimizer state and the schedule are saved."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    frozen = any(not p.requires_grad for p in model.parameters())
    return StateDictOptions(ignore_frozen_params=frozen, strict=not frozen)


def save_state(ckpt_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, *, is_main: bool) -> None:
    """Every rank writes its own shards; rank 0 writes the (tiny, identical) schedule state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(model))
    with warnings.catch_warnings():  # one process: "assuming the intent is to save in a single process"; it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(ckpt_dir / DCP_SUBDIR))
    if is_main:
        torch.save(scheduler.state_dict(), ckpt_dir / SCHEDULER_FILE)


def load_state(ckpt_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """Collective: a file missing or unreadable on any rank raises on every rank (DCP gathers errors)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (ckpt_dir / DCP_SUBDIR / ".metadata").is_file() and (ckpt_dir / DEEPSPEED_SUBDIR).is_dir():
        raise RuntimeError(f"{ckpt_dir} was written by the deepspeed backend: resume it with backend=deepspeed_zero2/3, "
                           f"or convert it with `vicuna-exp export {ckpt_dir} OUT_DIR`")
    options = _options(model)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    state = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(ckpt_dir / DCP_SUBDIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options)
    scheduler.load_state_dict(torch.load(ckpt_dir / SCHEDULER_FILE, weights_only=True))


class TorchOptimizerBackend(Backend):
    """A backend whose optimizer and schedule are torch objects over `self.module`'s parameters.

    Subclasses build `self.model` (what forward is called on), `self.module` (the underlying
    model), `self.optimizer` and `self.scheduler` in `setup`.
    """

    averages_gradients = False  # True where the gradient all-reduce divides by the world size

    def backward(self, loss: torch.Tensor) -> None:
        scale = self.dist.world_size if self.averages_gradients else 1  # the loop wants the sum over ranks
        (loss * scale).backward() if scale != 1 else loss.backward()

    def step(self) -> float:
        clip = float(self.cfg.trainer.grad_clip)
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm=clip if clip > 0 else float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a replicated DTensor
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def current_lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def save(self, ckpt_dir: Path) -> None:
        save_state(ckpt_dir, self.model, self.optimizer, self.scheduler, is_main=self.dist.is_main)

    def load(self, ckpt_dir: Path) -> None:
        load_state(ckpt_dir, self.model, self.optimizer, self.scheduler)

    def export_adapter(self, out_dir: Path) -> None:
        """Rank 0 writes the adapter (every replica holds the same one)."""
        from vicuna_exp.finetune import save_adapter

        if self.dist.is_main:
            save_adapter(self.module, out_dir, self.cfg.model.path)

    def state_bytes(self) -> dict[str, int]:
        params = list(self.module.parameters())
        grads = [p.grad for p in params if p.grad is not None]
        optim = [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim > 0]
        return {"params": tensor_bytes(iter(params)), "grads": tensor_bytes(iter(grads)),
                "optim": tensor_bytes(iter(optim))}
