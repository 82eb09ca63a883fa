"""Process-group facts and the few collectives the loop needs, that work with one process too.

Every collective of the project goes through this module (a test checks it), so the one rule that
nccl imposes, tensors on the rank's GPU, is kept in one place: `collective_device()`.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from vicuna_exp.choices import Device, DistBackend


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def from_env() -> DistInfo:
    """Read what torchrun put in the environment (one process when nothing is set)."""
    env = os.environ
    return DistInfo(
        rank=int(env.get("RANK", 0)),
        local_rank=int(env.get("LOCAL_RANK", 0)),
        world_size=int(env.get("WORLD_SIZE", 1)),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
    )


def select_device(requested: str, info: DistInfo) -> torch.device:
    from vicuna_exp.errors import UsageError

    if requested == Device.cpu or (requested == Device.auto and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError("trainer.device=cuda, but no CUDA device is visible (torch.cuda.is_available() is False)")
    if info.local_rank >= torch.cuda.device_count():
        raise UsageError(f"local rank {info.local_rank} has no GPU: only {torch.cuda.device_count()} visible")
    torch.cuda.set_device(info.local_rank)
    return torch.device("cuda", info.local_rank)


def init_process_group(info: DistInfo, device: torch.device, backend: str = DistBackend.auto,
                       timeout_s: float | None = None) -> None:
    """gloo on CPU, nccl on GPU, unless the launcher config names one. A collective waiting longer
    than `timeout_s` fails instead of hanging (behind the job's heartbeat watch)."""
    if not info.is_distributed or dist.is_initialized():
        return
    if backend == DistBackend.auto:
        backend = DistBackend.nccl if device.type == "cuda" else DistBackend.gloo
    kwargs: dict = {"device_id": device} if device.type == "cuda" else {}
    if timeout_s is not None:
        kwargs["timeout"] = timedelta(seconds=timeout_s)
    dist.init_process_group(backend=str(backend), **kwargs)


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def collective_device() -> torch.device:
    """Where a tensor must live to take part in a collective of the process group: nccl serves only
    CUDA tensors (on this rank's device), gloo serves CPU tensors."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place across ranks, wherever `t` lives; the identity with one process.

    The loop's bookkeeping (token counts, loss sums, stop flags) is small and lives on the host;
    it is moved to the collective device for the reduction and the result copied back, so the
    same call works under gloo and nccl.
    """
    if dist.is_initialized() and dist.get_world_size() > 1:
        device = collective_device()
        work = t if t.device == device else t.to(device)
        dist.all_reduce(work, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        if work is not t:
            t.copy_(work)
    return t


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj: object, src: int = 0) -> object:
    """`obj` from rank `src` on every rank (pickled; serialised through the collective device)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src, device=collective_device())
        return box[0]
    return obj


def free_port() -> int:
    """An unused local TCP port, for a process group of one that needs a MASTER_PORT."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
