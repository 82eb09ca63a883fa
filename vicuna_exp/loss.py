"""The token loss: summed next-token cross-entropy over the supervised positions of a batch.

Two paths with the same numbers (within 1e-5 in fp32):

- chunked (`trainer.loss_chunk_tokens` > 0, the default): the model's forward stops at the final
  hidden states; only the supervised positions (found by collate on the host) go through the LM
  head, a chunk at a time, each with an fp32 log-softmax. Each chunk's head and cross-entropy are
  checkpointed: forward keeps the chunk's hidden states only, and backward recomputes the chunk's
  logits just before it needs them, so at most one chunk's logits exist at any time.
- full (`trainer.loss_chunk_tokens=0`): logits at every position, upcast to fp32, then the loss.

Why recompute rather than backpropagate each chunk as it is made: the recipe runs one backward per
micro-batch, and every backend hangs its gradient machinery on that one backward (DDP's reducer,
FSDP2's post-backward reduce-scatter, ZeRO-3's gradient partitioning); one backward per chunk
would break that contract. The price is one more head forward per supervised token.

The forward runs through the backend's wrapper (DDP, FSDP2's root unit, the DeepSpeed engine), so
their forward hooks fire as for any forward; `logits_to_keep` with no positions keeps the model's
own head from projecting anything. The head is then called as a module, so FSDP2 (whose root unit
holds it, unsharded after the root's forward) and ZeRO-3 (whose module hooks gather its partitioned
weight at each call, forward and recompute) see an ordinary module call. ZeRO-3 gathers are
collectives, so every rank calls the head the same number of times: a micro-batch is cut into
`batch_split.loss_chunk_count` chunks, a number fixed by the config, however many positions a rank supervises.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vicuna_exp.data.encode import IGNORE
from vicuna_exp.errors import UsageError


def output_head(model: torch.nn.Module) -> torch.nn.Module:
    """The LM head as a module (`get_output_embeddings()`); exit 2 naming the class when there is none."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, torch.nn.Module):
        raise UsageError(f"trainer.loss_chunk_tokens: {type(model).__name__} has no output head module "
                         "(get_output_embeddings() returns none); set trainer.loss_chunk_tokens=0 for the "
                         "full-logits loss")
    return head


def _forward_kwargs(batch: dict[str, Any]) -> dict[str, Any]:
    """The model's inputs; a flattened batch's example boundaries go to every attention layer under
    the names transformers' varlen paths read (the lengths as host ints: no layer syncs on them)."""
    kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
              "attention_mask": batch.get("attention_mask"), "use_cache": False}
    if "cu_seqlens" in batch:
        kwargs.update(cu_seq_lens_q=batch["cu_seqlens"], cu_seq_lens_k=batch["cu_seqlens"],
                      max_length_q=batch["max_seqlen"], max_length_k=batch["max_seqlen"])
    return kwargs


def full_loss_sum(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Logits at every position, upcast to fp32, cross-entropy summed over the supervised ones."""
    logits = model(**_forward_kwargs(batch)).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


def final_hidden_states(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The final (normed) hidden states, through the model's own forward with no position projected."""
    nothing = batch["loss_positions"][:0]  # an empty index tensor already on the device
    out = model(**_forward_kwargs(batch), output_hidden_states=True, logits_to_keep=nothing)
    return out.hidden_states[-1]


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_loss_sum(model: torch.nn.Module, head: torch.nn.Module, batch: dict[str, Any], n_chunks: int) -> torch.Tensor:
    """The same sum as `full_loss_sum`, through the head at supervised positions, `n_chunks` at a time.

    Chunk bounds come from the host-side count (`num_supervised`), so nothing waits for the device.
    """
    hidden = final_hidden_states(model, batch)
    flat = hidden.reshape(-1, hidden.size(-1))
    positions, targets, n = batch["loss_positions"], batch["loss_targets"], int(batch["num_supervised"])
    size = max(1, math.ceil(n / n_chunks))
    total = flat.new_zeros((), dtype=torch.float32)
    for start in range(0, size * n_chunks, size):
        h = flat.index_select(0, positions[start:start + size])
        t = targets[start:start + size]
        if torch.is_grad_enabled():
            # No metadata check of the recomputed tensors: ZeRO-3 releases a frozen head's weight
            # (a LoRA base) right after its recomputed forward and gathers it again for its backward,
            # so the check would see the released placeholder; the values are the same.
            total = total + checkpoint(_chunk_loss, head, h, t, use_reentrant=False, determinism_check="none")
        else:
            total = total + _chunk_loss(head, h, t)
    return total
