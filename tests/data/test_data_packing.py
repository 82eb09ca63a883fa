"""Packed batches are exact: same loss as the examples run one at a time; rows are deterministic."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch

from vicuna_exp.data.batching import collate, epoch_rows, pack_best_fit, packing_efficiency

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
