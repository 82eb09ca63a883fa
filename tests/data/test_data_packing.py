"""Packed batches are exact: same loss as the examples run one at a time; rows are deterministic."""

from __future__ import annotations

import itertools

import datasets
import numpy as np
import pytest
import torch

from vicuna_exp.data.batching import (
    Layout,
    collate,
    epoch_rows,
    layout_for,
    pack_best_fit,
    packing_efficiency,
)

VOCAB = 97


def _dataset(lengths: list[int], seed: int = 0):
    rng = np.random.default_rng(seed)
    ids, labels = [], []
    for n in lengths:
        x = rng.integers(3, VOCAB, size=n).tolist()
        y = [t if rng.random() < 0.6 else -100 for t in x]
        y[0] = -100
        ids.append(x)
        labels.append(y)
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": labels, "length": lengths})


@pytest.fixture(scope="module")
def models():
    from transformers import LlamaConfig, LlamaForCausalLM

    out = {}
    for impl in ("sdpa", "eager"):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        model = LlamaForCausalLM._from_config(cfg, attn_implementation=impl, dtype=torch.float32)
        model.train()  # dropout is 0 in LLaMA; training mode is where use_cache leaked
        out[impl] = model
    return out


def _loss_sum(model, batch, **kwargs) -> tuple[float, int]:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, **kwargs).logits
    labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return float(loss), int((labels != -100).sum())


def _reference(model, ds, indices) -> tuple[float, int]:
    total, count = 0.0, 0
    for i in indices:
        ids = torch.tensor([ds[i]["input_ids"]])
        one = {"input_ids": ids, "labels": torch.tensor([ds[i]["labels"]])}
        s, c = _loss_sum(model, one, use_cache=False)
        total += s
        count += c
    return total, count


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_loss_equals_one_at_a_time(models, impl):
    model = models[impl]
    ds = _dataset([7, 1, 12, 5, 9, 3, 16, 2])
    rows = [[0, 1, 2], [3, 4], [5, 6, 7]]  # unequal row lengths: the shorter rows get a padding segment
    batch = collate(ds, rows, pad_id=0)
    assert "attention_mask" not in batch
    assert batch["position_ids"][0, :7].tolist() == list(range(7))
    assert batch["position_ids"][0, 7:9].tolist() == [0, 0]  # 1-token example, then positions restart
    with torch.no_grad():
        got, n_got = _loss_sum(model, batch, use_cache=False)
        want, n_want = _reference(model, ds, range(8))
        flat, n_flat = _loss_sum(model, collate(ds, rows, pad_id=0, flatten=True), use_cache=False)
    assert n_got == n_want == n_flat
    assert got == pytest.approx(want, rel=1e-5)
    assert flat == pytest.approx(want, rel=1e-5)


def test_use_cache_true_leaks_across_examples(models):
    """transformers' default use_cache=True builds a cache, which disables packed-sequence masking."""
    model = models["sdpa"]
    ds = _dataset([8, 8, 8])
    batch = collate(ds, [[0, 1, 2]], pad_id=0)
    with torch.no_grad():
        want, _ = _reference(model, ds, range(3))
        leaky, _ = _loss_sum(model, batch, use_cache=True)
        exact, _ = _loss_sum(model, batch, use_cache=False)
    assert exact == pytest.approx(want, rel=1e-5)
    assert abs(leaky - want) > 1e-3 * abs(want)


def test_unpacked_pads_to_longest_of_batch_with_mask(models):
    model = models["eager"]
    ds = _dataset([4, 11, 6])
    batch = collate(ds, [[0], [1], [2]], pad_id=0)
    assert batch["input_ids"].shape == (3, 11)  # the longest of the batch, never the full context
    assert batch["attention_mask"].sum(1).tolist() == [4, 11, 6]
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    with torch.no_grad():
        got, _ = _loss_sum(model, batch, use_cache=False)
        want, _ = _reference(model, ds, range(3))
    assert got == pytest.approx(want, rel=1e-5)


def test_epoch_rows_deterministic_and_complete():
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 200, size=500).tolist()
    ds = _dataset(lengths)
    a = epoch_rows(ds, epoch=0, seed=3, context_length=256, packing=True)
    b = epoch_rows(ds, epoch=0, seed=3, context_length=256, packing=True)
    c = epoch_rows(ds, epoch=1, seed=3, context_length=256, packing=True)
    assert a == b and a != c
    flat = sorted(i for row in a for i in row)
    assert flat == list(range(500))  # every example exactly once
    assert all(sum(lengths[i] for i in row) <= 256 for row in a)
    unpacked = epoch_rows(ds, epoch=0, seed=3, context_length=256, packing=False)
    assert sorted(r[0] for r in unpacked) == list(range(500)) and all(len(r) == 1 for r in unpacked)
    grouped = epoch_rows(ds, epoch=0, seed=3, context_length=256, packing=False, group_by_length=True)
    first = [lengths[r[0]] for r in grouped[:256]]
    assert first == sorted(first, reverse=True)


def test_best_fit_packs_tightly():
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(20, 2048, size=1500), rng.integers(2000, 2049, size=100)])
    rows = pack_best_fit(lengths, np.arange(len(lengths)), 2048)
    assert all(lengths[row].sum() <= 2048 for row in rows)
    assert packing_efficiency(lengths, rows, 2048) > 0.97


# ---- packed equals unpacked, loss and gradients, per kernel and dtype -------------------------------
# (relative error of the loss, relative norm of the gradient difference), as the GPU check states them
PARITY_TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 5e-2)}
PARITY_LENGTHS = [7, 1, 12, 5, 9, 3, 16, 2]
PARITY_ROWS = [[0, 1, 2], [3, 4], [5, 6, 7]]
CONTEXT = 40  # the rows' width when a kernel pads to the context length (flex attention)


def _tiny(impl: str, dtype: torch.dtype):
    """The same weights whatever the kernel (one seed), in `dtype`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation=impl, dtype=dtype)
    model.config.use_cache = False
    return model.train()


def _mean_loss_and_grad(model, batch, grads: bool = True) -> tuple[float, torch.Tensor | None]:
    """Through the trainer's own loss (its forward kwargs carry a flattened batch's boundaries)."""
    from vicuna_exp.loss import full_loss_sum

    n = int((batch["labels"][:, 1:] != -100).sum())
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grads):
        loss = full_loss_sum(model, batch) / n
    if not grads:
        return loss.item(), None
    loss.backward()
    return loss.item(), torch.cat([p.grad.float().flatten() for p in model.parameters()])


def _assert_close(got: tuple[float, torch.Tensor | None], want: tuple[float, torch.Tensor | None],
                  dtype: torch.dtype) -> None:
    loss_tol, grad_tol = PARITY_TOLERANCE[dtype]
    assert abs(got[0] - want[0]) <= loss_tol * abs(want[0])
    if want[1] is not None:
        assert float((got[1] - want[1]).norm() / want[1].norm()) <= grad_tol


def reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                     enable_gqa=False, **unused):
    """torch's varlen_attn computed on the CPU: sdpa over each example of the flattened row."""
    assert isinstance(max_q, int) and isinstance(max_k, int)  # host ints, never a device value
    assert max_q == int(cu_seq_q.diff().max())
    bounds = cu_seq_q.tolist()
    out = []
    for start, end in itertools.pairwise(bounds):
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))
        i = torch.arange(end - start)
        allowed = torch.ones(end - start, end - start, dtype=torch.bool)
        left, right = window_size
        if right >= 0:
            allowed &= i[None, :] <= i[:, None] + right
        if left >= 0:
            allowed &= i[None, :] >= i[:, None] - left
        out.append(torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, scale=scale, enable_gqa=enable_gqa).transpose(0, 1))
    return torch.cat(out)


def reference_varlen_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """The older shape: `is_causal`, no window, no GQA flag, no scale."""
    assert query.size(1) == key.size(1), "this kernel has no enable_gqa: K/V heads must be repeated"
    return reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k,
                            window_size=(-1, 0) if is_causal else (-1, -1))


@pytest.mark.parametrize("impl,dtype", [("sdpa", torch.float32), ("eager", torch.float32),
                                        ("sdpa", torch.bfloat16), ("eager", torch.bfloat16)])
def test_packed_loss_and_gradients_equal_unpacked(impl, dtype):
    """sdpa and eager fully on the CPU: the packed rows against the same examples one per padded row."""
    model = _tiny(impl, dtype)
    ds = _dataset(PARITY_LENGTHS)
    examples = [[i] for row in PARITY_ROWS for i in row]
    packed = _mean_loss_and_grad(model, collate(ds, PARITY_ROWS, pad_id=0))
    unpacked = _mean_loss_and_grad(model, collate(ds, examples, pad_id=0))
    _assert_close(packed, unpacked, dtype)


@pytest.mark.parametrize("kernel", [reference_varlen, reference_varlen_2_10], ids=["window_size", "is_causal"])
@pytest.mark.parametrize("packing", [True, False])
def test_varlen_through_its_registration_equals_unpacked_sdpa(kernel, packing, monkeypatch):
    """torch's varlen kernel is CUDA-only: a CPU reference of it stands in, so what is checked here is
    our half: the registration, collate's boundaries, the wrapper's arguments, GQA, the scale."""
    from torch.nn.attention import varlen

    from vicuna_exp.attention import register_varlen

    monkeypatch.setattr(varlen, "varlen_attn", kernel)
    register_varlen()
    ds = _dataset(PARITY_LENGTHS)
    examples = [[i] for row in PARITY_ROWS for i in row]
    layout = layout_for("varlen", packing=packing, context_length=CONTEXT)
    batch = collate(ds, PARITY_ROWS if packing else examples, pad_id=0, flatten=layout.flatten)
    got = _mean_loss_and_grad(_tiny("varlen", torch.float32), batch)
    want = _mean_loss_and_grad(_tiny("sdpa", torch.float32), collate(ds, examples, pad_id=0))
    _assert_close(got, want, torch.float32)


def test_flex_attention_packed_equals_unpacked_forward():
    """Forward only on the CPU, rows padded to the context length (one shape: no recompiles)."""
    ds = _dataset(PARITY_LENGTHS)
    examples = [[i] for row in PARITY_ROWS for i in row]
    layout = layout_for("flex_attention", packing=True, context_length=CONTEXT)
    packed_batch = collate(ds, PARITY_ROWS, pad_id=0, pad_to=layout.pad_to)
    assert packed_batch["input_ids"].shape == (3, CONTEXT)
    got = _mean_loss_and_grad(_tiny("flex_attention", torch.float32), packed_batch, grads=False)
    want = _mean_loss_and_grad(_tiny("sdpa", torch.float32), collate(ds, examples, pad_id=0), grads=False)
    _assert_close(got, want, torch.float32)


def test_flex_attention_builds_its_document_mask_once_per_batch(monkeypatch):
    """transformers builds the BlockMask from the packed position ids once per forward, not per layer."""
    from transformers import masking_utils

    calls = []
    real = masking_utils.create_block_mask
    monkeypatch.setattr(masking_utils, "create_block_mask", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = _tiny("flex_attention", torch.float32)
    batch = collate(_dataset(PARITY_LENGTHS), PARITY_ROWS, pad_id=0, pad_to=CONTEXT)
    with torch.no_grad():
        _mean_loss_and_grad(model, batch, grads=False)
    assert model.config.num_hidden_layers > 1 and len(calls) == 1


def test_flex_attention_gradients_equal_unpacked():
    ds = _dataset(PARITY_LENGTHS)
    model = _tiny("flex_attention", torch.float32)
    try:
        got = _mean_loss_and_grad(model, collate(ds, PARITY_ROWS, pad_id=0, pad_to=CONTEXT))
    except NotImplementedError as e:
        pytest.skip(f"flex attention has no backward on the CPU ({str(e).splitlines()[0][:120]}); the GPU check "
                    "compares its gradients")
    examples = [[i] for row in PARITY_ROWS for i in row]
    _assert_close(got, _mean_loss_and_grad(_tiny("sdpa", torch.float32), collate(ds, examples, pad_id=0)),
                  torch.float32)


def test_collate_lists_the_boundaries_of_a_flattened_batch():
    ds = _dataset([7, 1, 12, 5])
    batch = collate(ds, [[0, 1], [2, 3]], pad_id=0, flatten=True)
    assert batch["input_ids"].shape == (1, 25) and "attention_mask" not in batch
    assert batch["cu_seqlens"].tolist() == [0, 7, 8, 20, 25] and batch["cu_seqlens"].dtype == torch.int32
    assert batch["max_seqlen"] == 12 and type(batch["max_seqlen"]) is int
    assert "cu_seqlens" not in collate(ds, [[0, 1], [2, 3]], pad_id=0)
    padded = collate(ds, [[0], [2]], pad_id=0, pad_to=16)
    assert padded["input_ids"].shape == (2, 16) and padded["attention_mask"].sum(1).tolist() == [7, 12]
    with pytest.raises(ValueError, match="pad_to=8"):
        collate(ds, [[2]], pad_id=0, pad_to=8)


@pytest.mark.parametrize("attn,packing,layout", [
    ("sdpa", True, Layout()), ("eager", False, Layout()),
    ("flash_attention_2", True, Layout(flatten=True)), ("flash_attention_2", False, Layout()),
    ("varlen", True, Layout(flatten=True)), ("varlen", False, Layout(flatten=True)),
    ("flex_attention", True, Layout(pad_to=CONTEXT)), ("flex_attention", False, Layout(pad_to=CONTEXT)),
])
def test_each_kernel_gets_its_layout(attn, packing, layout):
    assert layout_for(attn, packing=packing, context_length=CONTEXT) == layout
