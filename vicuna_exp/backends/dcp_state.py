"""Model + optimizer + schedule state in the torch.distributed.checkpoint layout shared by
single, DDP and FSDP: `state/` (keyed by parameter name, so any of them can resume any other,
on any number of ranks: DCP reshards on load) and `scheduler.pt`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vicuna_exp.export import DCP_SUBDIR, DEEPSPEED_SUBDIR

SCHEDULER_FILE = "scheduler.pt"


def save_state(ckpt_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, *, is_main: bool) -> None:
    """Every rank writes its own shards; rank 0 writes the (tiny, identical) schedule state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
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
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(ckpt_dir / DCP_SUBDIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    scheduler.load_state_dict(torch.load(ckpt_dir / SCHEDULER_FILE, weights_only=True))
