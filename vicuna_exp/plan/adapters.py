"""What an adapter method (`finetune=lora`, `qlora`) changes in the plan: how many parameters
train, how the frozen base is stored, and which activations autograd saves once it is frozen.

State: the frozen base is held in its storage dtype (bf16 under bf16 and bf16_mixed, fp32 under
fp32; nothing updates it, so it needs no fp32 master), with no gradient and no AdamW state. The
adapters (and any module trained in full beside them) are fp32, with fp32 gradients and two fp32
moments: 16 bytes per trainable parameter, as in full fine-tuning. FSDP shards all of it over its
shard group; DeepSpeed holds it by its own accounting (`adapter_state_bytes`).

Activations per token per decoder layer with LoRA on every linear layer, measured with the same
saved-tensor hooks as full fine-tuning (tests/plan/test_plan_measured.py) on HF's LLaMA with
peft's LoRA layers: a frozen linear keeps no input for a weight gradient, each adapter keeps its
(dropped-out) input and its rank-r projection, and dropout adds a mask and a copy per target.

QLoRA (`quantized_base_bytes`): each decoder linear weight of n elements is held by bitsandbytes as
n/2 bytes of packed 4-bit codes, one absmax constant per QUANT_BLOCKSIZE elements (fp32; double
quantisation stores it as one byte, with an fp32 scale per NESTED_BLOCKSIZE constants, a 256-entry
fp32 code book and an fp32 offset), and its own 16-entry fp32 code book. Embeddings, norms, biases
and the LM head keep the storage dtype. Its matmuls save what LoRA's frozen bf16 linears save (the
4-bit matmul keeps only its packed weight for backward), so the activation terms are LoRA's with a
bf16 compute dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vicuna_exp.choices import FinetuneMethod, Precision
from vicuna_exp.plan.facts import ModelFacts

ALL_LINEAR = "all-linear"
QUANT_BLOCKSIZE = 64  # elements per absmax constant of a 4-bit weight (bitsandbytes' default, QLoRA's)
NESTED_BLOCKSIZE = 256  # absmax constants per fp32 scale once double-quantised (fixed in bitsandbytes)
_CODE_4BIT, _CODE_NESTED = 16 * 4, 256 * 4  # fp32 code books: the 4-bit one, the 8-bit one of the constants


def linear_shapes(m: ModelFacts) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear layer of a decoder block, by module name (the names every
    supported family uses: LLaMA, Mistral, Qwen2)."""
    h, i, kv = m.hidden_size, m.intermediate_size, m.kv_dim
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


@dataclass(frozen=True)
class AdapterFacts:
    """The trainable part of an adapter method."""

    method: FinetuneMethod
    r: int
    dropout: bool  # lora_dropout > 0: each target keeps a mask and a dropped-out copy of its input
    all_linear: bool  # the activation fit is of every linear layer adapted
    adapter_params: int  # low-rank matrices (+ DoRA magnitudes), fp32
    saved_module_params: int  # embeddings / LM head trained in full beside them (trainable copies)
    double_quant: bool | None = None  # qlora: the base's decoder linears in 4 bits (None: not quantised)
    lm_head_trained: bool = False  # train_lm_head: the head trains in full (6 FLOPs per weight, not 4)

    @property
    def quantized(self) -> bool:
        return self.double_quant is not None

    @property
    def trainable_params(self) -> int:
        return self.adapter_params + self.saved_module_params


def adapter_facts(m: ModelFacts, finetune: Any) -> AdapterFacts | None:
    """The adapters of `finetune` on this model; None for full fine-tuning."""
    if finetune is None or FinetuneMethod(finetune.name) == FinetuneMethod.full:
        return None
    shapes = linear_shapes(m)
    targets = list(finetune.target_modules)
    names = list(shapes) if targets == [ALL_LINEAR] else [t for t in targets if t in shapes]
    r = int(finetune.r)
    per_layer = sum(r * (shapes[n][0] + shapes[n][1]) + (shapes[n][1] if finetune.use_dora else 0) for n in names)
    saved = m.embedding_params * (int(bool(finetune.train_embeddings)) + int(bool(finetune.train_lm_head)))
    method = FinetuneMethod(finetune.name)
    double = bool(finetune.bnb_4bit_use_double_quant) if method == FinetuneMethod.qlora else None
    return AdapterFacts(method=method, r=r, dropout=float(finetune.lora_dropout) > 0,
                        all_linear=targets == [ALL_LINEAR], adapter_params=m.num_hidden_layers * per_layer,
                        saved_module_params=saved, double_quant=double,
                        lm_head_trained=bool(finetune.train_lm_head))


def base_bytes_per_param(precision: Precision) -> float:
    """The frozen base's storage dtype."""
    return 4.0 if precision == Precision.fp32 else 2.0


def quantized_weight_bytes(n: int, double_quant: bool) -> float:
    """One weight of n elements in bitsandbytes 4-bit, with its quantisation constants (module doc)."""
    blocks = -(-n // QUANT_BLOCKSIZE)
    constants = (blocks + 4 * -(-blocks // NESTED_BLOCKSIZE) + _CODE_NESTED + 4) if double_quant else 4 * blocks
    return float(-(-n // 2) + constants + _CODE_4BIT)


def quantized_base_bytes(m: ModelFacts, double_quant: bool, precision: Precision) -> float:
    """The frozen base of `finetune=qlora`: decoder linears in 4 bits, the rest in the storage dtype."""
    linears = [i * o for i, o in linear_shapes(m).values()]
    quantized = m.num_hidden_layers * sum(quantized_weight_bytes(n, double_quant) for n in linears)
    rest = m.total_params - m.num_hidden_layers * sum(linears)
    return quantized + base_bytes_per_param(precision) * rest


def adapter_state_bytes(m: ModelFacts, a: AdapterFacts, precision: Precision, shard_group: int,
                        zero_stage: int = 0) -> dict[str, float]:
    """Bytes per rank of params (frozen base + trainable), grads and AdamW state (trainable only).

    single, ddp and fsdp (`zero_stage` 0): the base in its storage dtype and fp32 adapters, all
    divided over the shard group (FSDP2 shards both alike). DeepSpeed (`zero_stage` 2 or 3) casts
    the whole module, adapters too, to the compute dtype, keeps it whole under ZeRO-2 and
    partitioned under ZeRO-3, and holds an fp32 master copy of the trainable part beside the two
    moments (12 bytes per trainable parameter, partitioned); gradients as for full fine-tuning,
    counted for the trainable part alone."""
    t, g, n = float(a.trainable_params), float(shard_group), float(m.total_params)
    if zero_stage:
        c = 4.0 if precision == Precision.fp32 else 2.0
        params = c * (n + t) / (g if zero_stage == 3 else 1.0)
        grads = (4.0 if zero_stage == 3 else c + (4.0 if c != 4.0 else 0.0)) * t / g
        return {"params": params, "grads": grads, "optim": 12.0 * t / g}
    base = quantized_base_bytes(m, bool(a.double_quant), precision) if a.quantized else base_bytes_per_param(precision) * n
    return {"params": (base + 4.0 * t) / g, "grads": 4.0 * t / g, "optim": 8.0 * t / g}


def activation_terms(m: ModelFacts, a: AdapterFacts, precision: Precision, autocast: bool) -> tuple[float, float]:
    """(bytes per token per decoder layer, bytes per token outside the layers), fitted exactly
    (to the byte) on five shapes and two ranks with every linear layer adapted."""
    h, i, kv, heads, hd, r = m.hidden_size, m.intermediate_size, m.kv_dim, m.num_attention_heads, m.head_dim, a.r
    if precision == Precision.fp32:
        per_layer = (64 * h + 20 * i if a.dropout else 24 * h + 16 * i) + 8 * kv + 28 * r
        outside = 8 * hd - (12 * h if a.dropout else 0)
    elif autocast:  # bf16 base, fp32 adapters, bf16 compute
        per_layer = (48 * h + 12 * i if a.dropout else 24 * h + 8 * i) + 4 * kv + 14 * r
        outside = 4 * hd - (12 * h if a.dropout else 0)
    else:  # bf16 base, fp32 adapters, no autocast: the adapter path runs in fp32
        per_layer = (60 * h + 14 * i if a.dropout else 36 * h + 10 * i) + 4 * kv + 28 * r
        outside = 4 * hd - (12 * h if a.dropout else 0)
    return float(per_layer + 4 * heads + 8), float(outside)
