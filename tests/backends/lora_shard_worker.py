"""One rank of the sharded-LoRA set-up check (tests/backends/test_lora_sharded.py), started by torchrun.

For each backend named on the command line: build the LoRA model on a pretrained base through the
backend exactly as training does (meta device, shard, fill), gather every adapter whole at step 0,
count the frozen base elements this rank holds, run one global batch (forward, backward, one
AdamW step) and count the bytes of parameters, gradients and optimizer state this rank holds.
Every rank writes its own JSON (`OUT.rank<r>.json`), with the planner's prediction beside it.

    torchrun --nproc_per_node=2 tests/backends/lora_shard_worker.py OUT BASE_DIR fsdp deepspeed_zero3
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch

from vicuna_exp import distributed as D
from vicuna_exp.backends import OptimizerSpec, backend_class
from vicuna_exp.backends.base import tensor_bytes
from vicuna_exp.hydra_app import compose
from vicuna_exp.model import make_model_spec
from vicuna_exp.plan import predicted_state_bytes

LORA = ["finetune=lora", "finetune.lora_dropout=0", "finetune.r=4", "trainer.precision=fp32", "trainer.seed=11"]


def overrides(backend: str, base: str, world: int) -> list[str]:
    return [f"backend={backend}", f"launcher.nproc_per_node={world}", "model.init=pretrained", f"model.path={base}",
            *LORA, "trainer.micro_batch_size=1", f"trainer.global_batch_size={world}", "context.length=64"]


def whole(p: torch.nn.Parameter) -> torch.Tensor:
    """A parameter's full value on every rank (a collective)."""
    if hasattr(p, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p]):
            return p.detach().clone().float()
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone().float()


def local_numel(p: torch.nn.Parameter) -> int:
    if hasattr(p, "ds_tensor"):
        return p.ds_tensor.numel()
    return p.to_local().numel() if hasattr(p, "to_local") else p.numel()


def held_bytes(backend: Any, name: str) -> dict[str, int]:
    """What this rank holds after the step; DeepSpeed: its partitions, fp32 masters and moments."""
    if name.startswith("deepspeed"):
        base = backend._base_optimizer()
        masters = list(backend.engine.optimizer.fp32_partitioned_groups_flat)  # ZeRO-3's fp32 partitions
        moments = [v for s in base.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim > 0]
        params = [getattr(p, "ds_tensor", p) for p in backend.module.parameters()]
        return {"params": tensor_bytes(iter(params)), "optim": tensor_bytes(iter(masters + moments))}
    return backend.state_bytes()


def one_backend(name: str, base: str, dist: D.DistInfo, device: torch.device) -> dict[str, Any]:
    cfg = compose(overrides(name, base, dist.world_size))
    torch.manual_seed(int(cfg.trainer.seed))
    spec = make_model_spec(cfg.model, vocab_size=1, device=device, precision="fp32", finetune=cfg.finetune,
                           seed=int(cfg.trainer.seed))
    optim = OptimizerSpec(lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8, fused=False, lr_lambda=lambda s: 1.0)
    backend = backend_class(cfg)(cfg, dist, device, "fp32")
    backend.setup(spec, optim)
    params = list(backend.module.named_parameters())
    adapters = {n: whole(p).tolist() for n, p in params if p.requires_grad}
    frozen = [p for _, p in params if not p.requires_grad]
    ids = torch.randint(3, 500, (1, 48), generator=torch.Generator().manual_seed(dist.rank))
    with backend.accumulate(is_last=True):
        loss = backend.model(input_ids=ids, labels=ids).loss
        backend.backward(loss / dist.world_size)
    grads = {"grads": backend.state_bytes()["grads"]} if name == "fsdp" else {}
    backend.optimizer.step() if name == "fsdp" else backend.engine.step()
    held = {**held_bytes(backend, name), **grads}
    out = {"adapters": adapters, "frozen_local": sum(local_numel(p) for p in frozen),
           "frozen_total": sum(getattr(p, "ds_numel", p.numel()) for p in frozen),
           "held": held, "predicted": predicted_state_bytes(cfg)}
    backend.close()
    return out


def main(out: str, base: str, names: list[str]) -> None:
    dist = D.from_env()
    device = torch.device("cpu")
    D.init_process_group(dist, device)
    results = {name: one_backend(name, base, dist, device) for name in names}
    with open(f"{out}.rank{dist.rank}.json", "w") as f:
        json.dump(results, f)
    D.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
