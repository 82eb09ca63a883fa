"""Torch's own flash-attention-2 (`torch.nn.attention.varlen.varlen_attn`) as the `varlen` choice of
`model.attn_implementation`, registered through transformers' `AttentionInterface`.

transformers calls a registered kernel once per layer with the query, key and value as
[batch, heads, seq, head_dim]. A name its `masking_utils` does not know gets no mask at all, which is
what a varlen kernel wants: its mask is the examples' boundaries. Those come from collate instead
(`batching.collate(flatten=True)`): every example of the micro-batch in one row, `cu_seqlens` (the
cumulative example lengths, int32, on the device) and `max_seqlen` (a host int). The loss passes
them to the model's forward under the names transformers' flash path reads (`cu_seq_lens_q`,
`max_length_q`, ...), and the forward hands them to every layer, so no layer reads a device value
back to the host.

`varlen_attn` changed its signature between torch releases: 2.10 and 2.11 take `is_causal`, later
ones a `window_size=(left, right)` (causal is `(-1, 0)`) and an `enable_gqa` flag. `varlen_signature`
reads which one the installed torch has, at run time; without the flag, grouped K/V heads are
repeated to the query heads. What the kernel cannot apply is refused, not dropped: a sliding window
where there is no `window_size`, and attention dropout (there is no dropout argument at all).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vicuna_exp.choices import AttnImpl
from vicuna_exp.errors import UsageError


@dataclass(frozen=True)
class VarlenSignature:
    """What this torch's `varlen_attn` takes, beyond the tensors and the boundaries."""

    window: bool  # `window_size=(left, right)`, which also says causal; else `is_causal`
    gqa: bool  # `enable_gqa`: K/V with fewer heads than the query
    scale: bool  # `scale`; else the query is scaled before the call


def varlen_kernel() -> Callable[..., torch.Tensor]:
    """torch's `varlen_attn`, looked up at each call (so a test can stand in a CPU reference)."""
    from torch.nn.attention import varlen

    return varlen.varlen_attn


@functools.cache
def varlen_signature(kernel: Callable[..., Any]) -> VarlenSignature:
    """The shape of `kernel`'s signature; UsageError when it is neither known one."""
    params = inspect.signature(kernel).parameters
    if "window_size" not in params and "is_causal" not in params:
        raise UsageError(f"model.attn_implementation=varlen: this torch's varlen_attn{inspect.signature(kernel)} "
                         "takes neither window_size nor is_causal, so causal attention cannot be asked of it; "
                         "use auto or sdpa")
    return VarlenSignature(window="window_size" in params, gqa="enable_gqa" in params, scale="scale" in params)


def check_varlen(hf_config: Any, window: int | None) -> None:
    """Refuse a model whose attention this torch's varlen kernel would silently change (exit 2);
    `window`: the sliding window its layers use, if any."""
    name = type(hf_config).__name__
    dropout = float(getattr(hf_config, "attention_dropout", 0.0) or 0.0)
    if dropout > 0:
        raise UsageError(f"model.attn_implementation=varlen: {name} has attention_dropout={dropout:g}, and torch's "
                         "varlen attention applies no dropout; use sdpa, or set the model's attention_dropout to 0")
    if window is not None and not varlen_signature(varlen_kernel()).window:
        raise UsageError(f"model.attn_implementation=varlen: this torch's varlen attention has no window_size, "
                         f"so it cannot apply the sliding window ({window}) of {name}; use sdpa or flex_attention, "
                         "or a torch whose varlen_attn takes window_size")


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """One layer's causal attention over the examples of a flattened row: [1, seq, heads, head_dim] out."""
    if cu_seq_lens_q is None or max_length_q is None:
        raise ValueError("varlen attention needs cu_seq_lens_q and max_length_q in the forward's kwargs: a batch "
                         "from batching.collate(flatten=True), passed through vicuna_exp.loss")
    if query.size(0) != 1:
        raise ValueError(f"varlen attention takes one flattened row, got a batch of {query.size(0)} rows")
    if dropout:
        raise ValueError(f"varlen attention applies no dropout, got dropout={dropout}")
    kernel = varlen_kernel()
    sig = varlen_signature(kernel)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [tokens, heads, head_dim]
    options: dict[str, Any] = {}
    if sig.window:
        options["window_size"] = (sliding_window - 1 if sliding_window else -1, 0)
    elif sliding_window:
        raise ValueError(f"this torch's varlen attention cannot apply a sliding window ({sliding_window})")
    else:
        options["is_causal"] = True
    if scaling is not None:
        if sig.scale:
            options["scale"] = scaling
        else:
            q = q * (scaling * math.sqrt(q.size(-1)))  # the kernel's own scale is 1/sqrt(head_dim)
    groups = q.size(1) // k.size(1)
    if groups > 1:
        if sig.gqa:
            options["enable_gqa"] = True
        else:  # each K/V head serves `groups` consecutive query heads, as transformers' repeat_kv lays them out
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    cu_k = cu_seq_lens_q if cu_seq_lens_k is None else cu_seq_lens_k
    max_k = max_length_q if max_length_k is None else max_length_k
    out = kernel(q, k, v, cu_seq_lens_q, cu_k, max_length_q, max_k, **options)
    return out.unsqueeze(0), None


def register_varlen() -> None:
    """Make `varlen` a name transformers' models accept as an attention implementation."""
    from transformers import AttentionInterface

    AttentionInterface.register(AttnImpl.varlen.value, varlen_attention_forward)
