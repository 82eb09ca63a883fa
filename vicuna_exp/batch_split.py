"""How a global batch is cut: rows per rank, micro-batches under the cap, which splits are valid,
and how many chunks the loss cuts a micro-batch's supervised positions into.

Plain integer arithmetic shared by the config checks, the training loop, the DeepSpeed config and
the planner, so all four cut a batch the same way. `trainer.micro_batch_size` is a memory cap, not
a divisor: the loss is normalised by the supervised tokens of the whole global batch, so how a
rank's rows are cut changes memory, never the gradient.
"""

from __future__ import annotations

import math


def micro_batch_sizes(rows: int, cap: int) -> list[int]:
    """`rows` cut into micro-batches of at most `cap`, the last one smaller where the division is
    uneven: 5 rows under a cap of 2 are [2, 2, 1]."""
    return [min(cap, rows - start) for start in range(0, rows, cap)]


def loss_chunk_count(micro_batch_size: int, context_length: int, chunk_tokens: int) -> int:
    """Head calls per micro-batch of the chunked loss: enough that a full micro-batch's positions fit
    `chunk_tokens` to a chunk. It depends on the config alone, so every rank makes the same number
    of calls whatever its data (ZeRO-3 gathers the head's weight at each call, a collective)."""
    return max(1, math.ceil(micro_batch_size * context_length / chunk_tokens))


def split_error(global_batch: int, nproc_per_node: int, nnodes: int, *, source: str) -> str | None:
    """Why `global_batch` rows cannot be split evenly over the ranks, with the nearest valid values;
    None when they can. `source` names the key the global batch came from."""
    world = nproc_per_node * nnodes
    if global_batch % world == 0:
        return None
    ranks = f"{world} ranks (launcher.nproc_per_node={nproc_per_node} x launcher.nnodes={nnodes})"
    problem = (f"{global_batch} rows per step are fewer than the {ranks}" if global_batch < world
               else f"{global_batch} rows per step cannot be split evenly over {ranks}")
    below, above = global_batch // world * world, -(-global_batch // world) * world
    nearest = " or ".join(str(v) for v in (below, above) if v > 0)
    divisors = ", ".join(str(d) for d in range(1, global_batch + 1) if global_batch % d == 0)
    return (f"{source}: {problem}; the nearest valid trainer.global_batch_size is {nearest}, "
            f"or use a number of ranks that divides {global_batch} ({divisors})")


def describe(micro_batches: list[int]) -> str:
    """'5 rows per GPU: 2 micro-batches of 2 + 1 of 1', as the planner prints a rank's step."""
    full, last = micro_batches[0], micro_batches[-1]
    n_full = sum(1 for m in micro_batches if m == full)
    parts = f"{n_full} micro-batch{'es' if n_full > 1 else ''} of {full}"
    if last != full:
        parts += f" + 1 of {last}"
    return f"{sum(micro_batches)} row{'s' if sum(micro_batches) > 1 else ''} per GPU: {parts}"
