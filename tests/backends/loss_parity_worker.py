"""One rank of the loss-parity check (tests/backends/test_loss_parity.py), started by torchrun.

For each backend named on the command line, tied and untied: build the tiny model through the
backend exactly as training does, run one global batch (two micro-batches per rank, the loss
normalised by the global supervised-token count) with the full-logits loss and then the chunked
one, and record both losses, the full gradients and the eval losses. Rank 0 writes them as JSON.

    torchrun --nproc_per_node=2 tests/backends/loss_parity_worker.py OUT.json ddp fsdp deepspeed_zero3
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
from datasets import Dataset

from vicuna_exp import distributed as D
from vicuna_exp.backends import OptimizerSpec, backend_class
from vicuna_exp.batch_split import loss_chunk_count
from vicuna_exp.data import batching
from vicuna_exp.hydra_app import compose
from vicuna_exp.loss import chunked_loss_sum, full_loss_sum, output_head
from vicuna_exp.model import make_model_spec

VOCAB, CONTEXT, MICRO, CHUNK = 512, 64, 2, 24


def examples(rank: int) -> Dataset:
    """Conversations of different lengths with alternating unsupervised (user) and supervised spans;
    each rank gets its own, so the ranks' supervised counts differ."""
    g = torch.Generator().manual_seed(100 + rank)
    ids, labels = [], []
    for k in range(2 * MICRO):
        n = int(torch.randint(20, CONTEXT + 1, (1,), generator=g))
        x = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        cut = 5 + 3 * k + rank
        y = [-100] * cut + x[cut:n - 4] + [-100] * 4
        ids.append(x)
        labels.append(y)
    return Dataset.from_dict({"input_ids": ids, "labels": labels})


def batches(data: Dataset, device: torch.device) -> list[dict[str, Any]]:
    out = []
    for start in range(0, len(data), MICRO):
        b = batching.collate(data, [[i] for i in range(start, start + MICRO)], pad_id=0)
        n = len(b["loss_targets"])
        out.append({**{k: v.to(device) for k, v in b.items()}, "num_supervised": n})
    return out


def full_grads(backend: Any) -> list[torch.Tensor]:
    """Every parameter's whole gradient, on every rank (collectives in the same order everywhere)."""
    grads = []
    for p in backend.module.parameters():
        if hasattr(p, "ds_id"):
            from deepspeed.utils import safe_get_full_grad

            grads.append(safe_get_full_grad(p).detach().clone())
        elif hasattr(p.grad, "full_tensor"):
            grads.append(p.grad.full_tensor().detach().clone())
        else:
            grads.append(p.grad.detach().clone())
    return grads


def loss_fn(backend: Any, chunked: bool) -> Any:
    if not chunked:
        return lambda batch: full_loss_sum(backend.model, batch)
    head, n_chunks = output_head(backend.module), loss_chunk_count(MICRO, CONTEXT, CHUNK)
    return lambda batch: chunked_loss_sum(backend.model, head, batch, n_chunks)


def one_backend(name: str, tied: bool, dist: D.DistInfo, device: torch.device) -> dict[str, Any]:
    cfg = compose([f"backend={name}", f"launcher.nproc_per_node={dist.world_size}", "trainer.precision=fp32",
                   f"model.tie_word_embeddings={str(tied).lower()}", f"model.gradient_checkpointing={str(tied).lower()}",
                   "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=2",
                   f"trainer.micro_batch_size={MICRO}", f"trainer.global_batch_size={2 * MICRO * dist.world_size}"])
    torch.manual_seed(0)
    spec = make_model_spec(cfg.model, vocab_size=VOCAB, device=device, precision="fp32")
    optim = OptimizerSpec(lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8, fused=False, lr_lambda=lambda s: 1.0)
    backend = backend_class(cfg)(cfg, dist, device, "fp32")
    backend.setup(spec, optim)
    micro = batches(examples(dist.rank), device)
    total = D.all_reduce(torch.tensor(float(sum(b["num_supervised"] for b in micro)), device=device))
    result: dict[str, Any] = {}
    for mode in ("full", "chunked"):
        fn = loss_fn(backend, mode == "chunked")
        loss_sum = torch.zeros((), device=device)
        for i, batch in enumerate(micro):
            with backend.accumulate(is_last=i == len(micro) - 1):
                with backend.autocast():
                    token_loss = fn(batch)
                backend.backward(token_loss / total)
            loss_sum += token_loss.detach()
        grads = full_grads(backend)
        backend.zero_grad()
        with backend.evaluating():
            eval_sum = sum(fn(batch).double() for batch in micro)
        result[mode] = {"loss": float(D.all_reduce(loss_sum)) / float(total),
                        "eval_loss": float(D.all_reduce(eval_sum.reshape(1))[0]) / float(total),
                        "grads": grads}
    backend.close()
    full, chunked = result["full"], result["chunked"]
    return {"loss_full": full["loss"], "loss_chunked": chunked["loss"],
            "eval_full": full["eval_loss"], "eval_chunked": chunked["eval_loss"],
            "grad_max_abs": max(float(g.abs().max()) for g in full["grads"]),
            "grad_max_diff": max(float((a - b).abs().max()) for a, b in zip(full["grads"], chunked["grads"], strict=True))}


def main(out: str, names: list[str]) -> None:
    dist = D.from_env()
    device = torch.device("cpu")
    D.init_process_group(dist, device)
    results = {f"{name}/{'tied' if tied else 'untied'}": one_backend(name, tied, dist, device)
               for name in names for tied in (False, True)}
    if dist.is_main:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    D.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
