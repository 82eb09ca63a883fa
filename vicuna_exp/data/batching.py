"""Rows and batches: which examples share a row in an epoch, and how a batch of rows becomes tensors.

Packing is padding-free: a packed row concatenates whole examples, `position_ids` restart at 0
for each, and no token attends across examples. transformers derives a block-diagonal causal mask
from restarting `position_ids` (`masking_utils.find_packed_sequence_indices`, sdpa and eager) when
the forward gets `attention_mask=None` and no cache; flash-attention 2 takes the same signal as
varlen boundaries but only for a batch of one row (`flatten=True`), and torch's varlen kernel reads
the boundaries collate lists for that row (`cu_seqlens`, `max_seqlen`). `layout_for` says which
layout each kernel needs. The forward of a packed batch
must therefore pass `use_cache=False` (with a cache object, transformers skips the packed-sequence
detection and tokens see the previous example) and no attention mask.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from vicuna_exp.choices import AttnImpl
from vicuna_exp.data.encode import IGNORE
from vicuna_exp.errors import UsageError

if TYPE_CHECKING:
    import torch

PACK_WINDOW = 8192  # examples bin-packed together; larger packs tighter, smaller mixes more per epoch
GROUP_WINDOW = 256  # unpacked group_by_length: examples sorted by length within shuffled windows


def example_lengths(dataset: Any) -> np.ndarray:
    """Token count of every example (the prepared `length` column, else from `input_ids`; an array of
    lengths is its own answer)."""
    if isinstance(dataset, np.ndarray):
        return dataset.astype(np.int64, copy=False)
    names = getattr(dataset, "column_names", None) or []
    if "length" in names and hasattr(dataset, "with_format"):
        return np.asarray(dataset.with_format("numpy", columns=["length"])[:]["length"], dtype=np.int64)
    if "length" in names:
        return np.asarray(dataset["length"], dtype=np.int64)
    return np.asarray([len(x) for x in dataset["input_ids"]], dtype=np.int64)


def pack_best_fit(lengths: np.ndarray, order: np.ndarray, capacity: int) -> list[list[int]]:
    """Best-fit decreasing: each example, longest first, into the fullest row it still fits.

    `order` is the candidate examples (indices into `lengths`); ties keep their order in `order`.
    """
    ranked = order[np.argsort(-lengths[order], kind="stable")]
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, row index), kept sorted
    for idx in ranked.tolist():
        need = int(lengths[idx])
        pos = bisect.bisect_left(free, (need, -1))
        if pos == len(free):
            rows.append([idx])
            bisect.insort(free, (capacity - need, len(rows) - 1))
            continue
        remaining, row = free.pop(pos)
        rows[row].append(idx)
        bisect.insort(free, (remaining - need, row))
    return rows


def epoch_rows(
    dataset: Any,
    *,
    epoch: int,
    seed: int,
    context_length: int,
    packing: bool,
    group_by_length: bool = False,
) -> list[list[int]]:
    """The rows of one epoch, each a list of example indices, in training order.

    Deterministic in (seed, epoch): every rank computes the same list and takes its own slice.
    Packed: examples shuffled, bin-packed within windows of `PACK_WINDOW` up to `context_length`,
    rows shuffled. Unpacked: one example per row, shuffled; with `group_by_length`, sorted by length
    within shuffled windows so a batch pads little.
    """
    lengths = example_lengths(dataset)
    rng = np.random.default_rng([int(seed), int(epoch), 0x5EED])
    order = rng.permutation(len(lengths))
    if packing:
        rows: list[list[int]] = []
        for start in range(0, len(order), PACK_WINDOW):
            rows.extend(pack_best_fit(lengths, order[start:start + PACK_WINDOW], context_length))
        return [rows[i] for i in rng.permutation(len(rows)).tolist()]
    if group_by_length:
        grouped: list[int] = []
        for start in range(0, len(order), GROUP_WINDOW):
            window = order[start:start + GROUP_WINDOW]
            grouped.extend(window[np.argsort(-lengths[window], kind="stable")].tolist())
        return [[i] for i in grouped]
    return [[i] for i in order.tolist()]


@dataclass(frozen=True)
class StepPlan:
    """The optimizer steps of a run: how many each epoch holds, and where a global step falls."""

    per_epoch: tuple[int, ...]
    total: int  # may stop inside the last epoch (`trainer.max_steps`)

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, index within the epoch) of a 1-based global step: the data order is a function of it."""
        index = step - 1
        for epoch, n in enumerate(self.per_epoch):
            if index < n:
                return epoch, index
            index -= n
        raise AssertionError(f"step {step} is past the planned {self.total} steps")

    def epoch_progress(self, step: int) -> float:
        """Epochs done once `step` is: 1.5 halfway through the second."""
        epoch, index = self.position(step)
        return round(epoch + (index + 1) / self.per_epoch[epoch], 4)


def plan_steps(rows_in_epoch: Callable[[int], int], *, global_batch_size: int, context_length: int,
               epochs: float, token_budget: int | None = None, max_steps: int | None = None) -> StepPlan:
    """Optimizer steps per epoch from each epoch's exact number of rows (packing makes it vary);
    the last partial batch of an epoch is dropped.

    `token_budget` (token slots: rows x context) replaces `epochs` and buys as many steps, over as
    many epochs, as it pays for; a fractional `epochs` trains that fraction of the last epoch.
    """
    gbs = global_batch_size
    if rows_in_epoch(0) // gbs == 0:
        raise UsageError(f"trainer.global_batch_size: {gbs} rows per step but the training split has only "
                         f"{rows_in_epoch(0)} rows; lower the batch size or add data")
    if token_budget is not None:
        total = max(1, token_budget // (gbs * context_length))
        per_epoch: list[int] = []
        while sum(per_epoch) < total:
            per_epoch.append(rows_in_epoch(len(per_epoch)) // gbs)
    else:
        n_epochs = math.ceil(epochs)
        per_epoch = [rows_in_epoch(e) // gbs for e in range(n_epochs)]
        per_epoch[-1] = max(1, int(per_epoch[-1] * (epochs - (n_epochs - 1))))
        total = sum(per_epoch)
    if max_steps is not None:
        total = min(total, max_steps)
    return StepPlan(tuple(per_epoch), total)


def packing_efficiency(lengths: np.ndarray, rows: Sequence[Sequence[int]], context_length: int) -> float:
    """Real tokens / token slots when every row is a full context (the worst case of a batch)."""
    if not rows:
        return 0.0
    real = sum(int(lengths[i]) for row in rows for i in row)
    return real / (len(rows) * context_length)


@dataclass(frozen=True)
class Layout:
    """How an attention kernel wants a batch's rows laid out (`collate`'s keywords)."""

    flatten: bool = False  # every example in one row, with `cu_seqlens` and `max_seqlen`
    pad_to: int | None = None  # a fixed row width (else the batch's longest)


def layout_for(attn: str, *, packing: bool, context_length: int) -> Layout:
    """flash_attention_2 reads packed boundaries only from a single flattened row; torch's varlen
    reads nothing else (it gets no mask, so unpacked rows are flattened too); flex attention
    recompiles for every new row width, so its rows are padded to the context length."""
    if attn == AttnImpl.varlen or (packing and attn == AttnImpl.flash_attention_2):
        return Layout(flatten=True)
    if attn == AttnImpl.flex_attention:
        return Layout(pad_to=context_length)
    return Layout()


def collate(
    dataset: Any,
    rows: Sequence[Sequence[int]],
    pad_id: int,
    *,
    flatten: bool = False,
    pad_to: int | None = None,
) -> dict[str, Any]:
    """Tensors for a batch of rows.

    Packed (a row holds several examples, or `flatten=True`): `input_ids`, `labels`, `position_ids`,
    no `attention_mask`. Rows are padded to the longest row of the batch (or to `pad_to`) with a
    padding segment of its own (restarting positions, labels -100); `flatten=True` puts all rows into
    one row with no padding at all, and adds the example boundaries varlen kernels read:
    `cu_seqlens` (int32, the cumulative example lengths from 0) and `max_seqlen` (a host int).
    Unpacked: padded to the longest example of the batch (or to `pad_to`), with `attention_mask`.
    Labels are unshifted (the model shifts them) and are -100 on every example's first token, so no
    position predicts across an example boundary. `loss_positions` and `loss_targets` list the
    supervised positions (`supervised_positions`).
    """
    import torch

    flat = [i for row in rows for i in row]
    if not flat:
        raise ValueError("collate needs at least one example")
    unique = sorted(set(flat))
    fetched = dataset[unique]
    by_index = {i: (fetched["input_ids"][k], fetched["labels"][k]) for k, i in enumerate(unique)}
    packed = flatten or any(len(row) > 1 for row in rows)
    if flatten:
        rows = [flat]
    seqs: list[tuple[list[int], list[int], list[int]]] = []
    for row in rows:
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        for i in row:
            x, y = by_index[i]
            ids.extend(x)
            labels.extend(y)
            pos.extend(range(len(x)))
        seqs.append((ids, labels, pos))
    width = max(len(s[0]) for s in seqs)
    if pad_to is not None and not flatten:
        if width > pad_to:
            raise ValueError(f"a row of {width} tokens does not fit pad_to={pad_to}")
        width = pad_to
    n = len(seqs)
    input_ids = torch.full((n, width), int(pad_id), dtype=torch.long)
    label_t = torch.full((n, width), IGNORE, dtype=torch.long)
    if packed:
        # the padding tail is a segment of its own: positions restart, so it attends only to itself
        position_ids = torch.arange(width, dtype=torch.long).repeat(n, 1)
    else:
        position_ids = torch.arange(width, dtype=torch.long).repeat(n, 1)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
    for r, (ids, labels, pos) in enumerate(seqs):
        k = len(ids)
        input_ids[r, :k] = torch.tensor(ids, dtype=torch.long)
        label_t[r, :k] = torch.tensor(labels, dtype=torch.long)
        if packed:
            position_ids[r, :k] = torch.tensor(pos, dtype=torch.long)
            position_ids[r, k:] = torch.arange(width - k, dtype=torch.long)
        else:
            attention_mask[r, :k] = 1
    batch: dict[str, Any] = {"input_ids": input_ids, "labels": label_t, "position_ids": position_ids}
    if not packed:
        batch["attention_mask"] = attention_mask
    if flatten:
        lengths = [len(by_index[i][0]) for i in flat]
        batch["cu_seqlens"] = torch.tensor(list(itertools.accumulate(lengths, initial=0)), dtype=torch.int32)
        batch["max_seqlen"] = max(lengths)
    batch["loss_positions"], batch["loss_targets"] = supervised_positions(label_t)
    return batch


def supervised_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat indices into the batch's positions, targets) of every position that predicts a supervised
    token: position t of a row predicts the label at t + 1. Found here, on the host, so the loss
    indexes the device's hidden states with a known index and never a device-side mask."""
    width = labels.size(1)
    shifted = labels[:, 1:]
    rows, cols = (shifted != IGNORE).nonzero(as_tuple=True)
    return rows * width + cols, shifted[rows, cols]
