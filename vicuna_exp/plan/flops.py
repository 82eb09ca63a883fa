"""Model FLOPs and utilisation: the numbers that say how well a run uses its hardware.

Convention (PaLM, appendix B): a token costs 6N FLOPs for its matmuls (forward 2N, backward 4N)
plus 12 * L * h * s for attention over a sequence of s tokens (QK^T and AV, forward and
backward, counted in full although causal kernels skip half). The LM head's share of N
(vocab x hidden) counts only at the positions it projects (see `batch_flops`). Recomputation by activation
checkpointing is not counted: MFU measures useful model work, not hardware work.

A frozen base (LoRA, QLoRA) needs no gradient of its own weights, only of their inputs: 4 FLOPs per
parameter and token (forward 2, input gradient 2) instead of 6, plus 6 per adapter parameter. The
LM head counts 6 when it is trained in full (`train_lm_head`). Attention's cost does not change.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vicuna_exp.choices import Precision
from vicuna_exp.plan.facts import ModelFacts, model_facts

ModelLike = Any  # ModelFacts, or a `cfg.model` node to read them from


def _facts(model: ModelLike) -> ModelFacts:
    return model if isinstance(model, ModelFacts) else model_facts(model)


def batch_flops(model: ModelLike, seq_lens: Sequence[int], head_tokens: int | None = None,
                adapters: Any = None) -> float:
    """Training FLOPs (forward + backward) of examples of these lengths.

    In a padding-free packed row each example attends only to itself, so pass the lengths of the
    examples, not of the row; padding tokens are not useful work and are not passed.

    The LM head counts where it is applied: at `head_tokens` positions (the chunked loss projects
    only the supervised ones), or at every token when None (the full-logits loss, and the
    planner, which does not know the data). Its recomputation in the chunked loss's backward is not
    counted, as activation checkpointing's is not. `adapters` (plan.adapters.AdapterFacts): the base
    is frozen and these train (None: full fine-tuning).
    """
    m = _facts(model)
    tokens = sum(seq_lens)
    head = tokens if head_tokens is None else head_tokens
    squares = sum(s * s for s in seq_lens)
    body = m.matmul_params - m.embedding_params
    per_body, per_head, adapter = 6.0, 6.0, 0.0
    if adapters is not None:  # frozen weights: forward and the input's gradient only
        per_body, per_head = 4.0, (6.0 if adapters.lm_head_trained else 4.0)
        adapter = 6.0 * adapters.adapter_params * tokens
    return (per_body * body * tokens + per_head * m.embedding_params * head + adapter
            + 12.0 * m.num_hidden_layers * m.hidden_size * squares)


def flops_per_token(model: ModelLike, seq_lens: Sequence[int], adapters: Any = None) -> float:
    """Mean training FLOPs per real token for examples of these lengths (see `batch_flops`)."""
    tokens = sum(seq_lens)
    if tokens <= 0:
        raise ValueError("flops_per_token needs at least one token")
    return batch_flops(model, seq_lens, adapters=adapters) / tokens


def peak_tflops(hardware: Any, precision: str) -> float:
    """The datasheet peak of one device for the precision the matmuls run in; 0 when unknown (a GPU
    without a profile or an entry in the chip table), which leaves MFU unreported."""
    peak = hardware.fp32_tflops if precision == Precision.fp32 else hardware.bf16_tflops
    return float(peak) if peak is not None else 0.0


def achieved_tflops(model_flops: float, seconds: float, n_devices: int) -> float:
    """Model TFLOP/s per device: total model FLOPs of a step over its wall time and devices."""
    if seconds <= 0 or n_devices <= 0:
        return 0.0
    return model_flops / seconds / n_devices / 1e12


def mfu(model_flops: float, seconds: float, n_devices: int, peak_tflops_per_device: float) -> float | None:
    """Model FLOPs utilisation in [0, 1]: achieved model TFLOP/s per device over the peak (None when
    the peak is unknown). The model FLOPs count the LM head where it is applied (`batch_flops`):
    under the chunked loss only the supervised positions. Work skipped is not counted as done, so MFU
    stays comparable with anchors (PaLM, torchtitan) that count the head where they compute it."""
    if peak_tflops_per_device <= 0:
        return None
    return achieved_tflops(model_flops, seconds, n_devices) / peak_tflops_per_device
