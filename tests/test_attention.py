"""torch's varlen attention behind transformers' AttentionInterface: the signature read at run time,
the arguments the wrapper passes, and what it refuses. The kernel is CUDA-only, so recording fakes
stand in for it here; tests/data/test_data_packing.py checks packed == unpacked through the
registration with a CPU reference of it, and the GPU check with the real one."""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import LlamaConfig, MistralConfig

from vicuna_exp import attention as A
from vicuna_exp.errors import UsageError


def new_shape(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
              window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """The signature of torch 2.13's varlen_attn."""


def old_shape(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """The signature of torch 2.10's varlen_attn."""


def neither(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k):
    """A signature with no way to ask for causal attention."""


def test_the_signature_is_read_at_run_time() -> None:
    assert A.varlen_signature(new_shape) == A.VarlenSignature(window=True, gqa=True, scale=True)
    assert A.varlen_signature(old_shape) == A.VarlenSignature(window=False, gqa=False, scale=False)
    with pytest.raises(UsageError, match="neither window_size nor is_causal"):
        A.varlen_signature(neither)
    from torch.nn.attention import varlen

    assert A.varlen_signature(varlen.varlen_attn).window  # this torch (2.13) takes window_size


class Recorder:
    """A stand-in kernel that keeps its arguments and answers zeros of the query's shape."""

    def __init__(self, like) -> None:
        self.calls: list[tuple[tuple, dict]] = []
        self.__signature__ = inspect.signature(like)

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return torch.zeros_like(args[0])


def _qkv(tokens: int = 10, heads: int = 4, kv_heads: int = 2, dim: int = 8):
    q = torch.randn(1, heads, tokens, dim)
    k, v = torch.randn(1, kv_heads, tokens, dim), torch.randn(1, kv_heads, tokens, dim)
    return q, k, v


def _call(monkeypatch: pytest.MonkeyPatch, like, **kwargs):
    kernel = Recorder(like)
    monkeypatch.setattr(A, "varlen_kernel", lambda: kernel)
    q, k, v = _qkv()
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    out, weights = A.varlen_attention_forward(torch.nn.Module(), q, k, v, None, scaling=0.5, cu_seq_lens_q=cu,
                                              cu_seq_lens_k=cu, max_length_q=6, max_length_k=6, **kwargs)
    assert out.shape == (1, 10, 4, 8) and weights is None  # [batch, tokens, heads, head_dim], as transformers reads
    (args, options), = kernel.calls
    return args, options, (q, k, v, cu)


def test_the_new_signature_gets_a_causal_window_gqa_and_the_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    args, options, (q, k, v, cu) = _call(monkeypatch, new_shape)
    assert options == {"window_size": (-1, 0), "scale": 0.5, "enable_gqa": True}
    assert torch.equal(args[0], q[0].transpose(0, 1)) and torch.equal(args[1], k[0].transpose(0, 1))
    assert args[3] is cu and args[4] is cu and args[5:] == (6, 6)
    _, options, _ = _call(monkeypatch, new_shape, sliding_window=4)
    assert options["window_size"] == (3, 0)  # a window of 4 sees the token itself and the 3 before it


def test_the_old_signature_gets_is_causal_repeated_heads_and_a_prescaled_query(monkeypatch: pytest.MonkeyPatch) -> None:
    args, options, (q, k, _, _) = _call(monkeypatch, old_shape)
    assert options == {"is_causal": True}
    assert args[1].shape == (10, 4, 8)  # the 2 K/V heads repeated to the 4 query heads, each serving 2
    assert torch.equal(args[1][:, 0], args[1][:, 1]) and torch.equal(args[1][:, 1], k[0, 0])
    assert torch.allclose(args[0], q[0].transpose(0, 1) * 0.5 * 8 ** 0.5)  # the kernel scales by 1/sqrt(8)
    with pytest.raises(ValueError, match="cannot apply a sliding window"):
        _call(monkeypatch, old_shape, sliding_window=4)


def test_the_wrapper_refuses_what_it_cannot_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="no dropout"):
        _call(monkeypatch, new_shape, dropout=0.1)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="cu_seq_lens_q and max_length_q"):
        A.varlen_attention_forward(torch.nn.Module(), q, k, v, None)
    two = torch.cat([q, q])
    with pytest.raises(ValueError, match="one flattened row, got a batch of 2"):
        A.varlen_attention_forward(torch.nn.Module(), two, k, v, None, cu_seq_lens_q=torch.tensor([0, 10]),
                                   max_length_q=10)


def test_a_model_whose_attention_varlen_would_change_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UsageError, match="attention_dropout=0.1, and torch's varlen attention applies no dropout"):
        A.check_varlen(LlamaConfig(attention_dropout=0.1), None)
    mistral = MistralConfig(sliding_window=4096)
    A.check_varlen(mistral, 4096)  # this torch's kernel takes window_size
    monkeypatch.setattr(A, "varlen_kernel", lambda: old_shape)
    with pytest.raises(UsageError, match=r"cannot apply the sliding window \(4096\) of MistralConfig"):
        A.check_varlen(mistral, 4096)
    A.check_varlen(LlamaConfig(), None)
