"""The architecture facts the planner reasons with, read from `cfg.model` without loading a model.

A pretrained model's facts come from `model.path`'s config.json when it exists locally, the
preset's values otherwise; the vocabulary falls back to the tokenizer. The plan says which source
it used, and names the keys still missing. The families differ in facts a config states (grouped
K/V heads, tied embeddings, `attention_bias` / `mlp_bias`) and in one its layer hard-codes: Qwen2's
q/k/v projections always carry a bias (`QKV_BIAS_FAMILIES`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vicuna_exp.choices import AttnImpl, Precision
from vicuna_exp.errors import UsageError
from vicuna_exp.hardware import NAMED_ATTENTION, AttentionChoice, probe_attention, resolve_attention

# model_type of the families whose attention layer has a q/k/v bias whatever the config says.
QKV_BIAS_FAMILIES = frozenset({"qwen2"})

REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
PACKAGED_TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "tokenizer"


@dataclass(frozen=True)
class ModelFacts:
    """A LLaMA-style decoder (LLaMA, Llama-3, Mistral, Qwen2): embedding, L x (attention with grouped
    K/V heads + SwiGLU MLP + 2 RMSNorms), norm, lm_head; biases where the family has them."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # bias on the q, k and v projections (Qwen2; LLaMA's attention_bias)
    o_bias: bool = False  # bias on the output projection (LLaMA's attention_bias)
    mlp_bias: bool = False  # bias on gate, up and down (LLaMA's mlp_bias)
    sliding_window: int | None = None  # attention sees only the last N tokens (Mistral v0.1)
    attn_implementation: AttnImpl = AttnImpl.sdpa
    attn_reason: str = NAMED_ATTENTION  # or why `auto` picked it, for the plan to say
    gradient_checkpointing: bool = False
    source: str = "the model config"  # where the architecture facts came from, for the plan to say

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def layer_bias_params(self) -> int:
        """The bias vectors of one decoder layer: no matmul, but parameters, gradients and state."""
        h, i = self.hidden_size, self.intermediate_size
        return ((h + 2 * self.kv_dim) * self.qkv_bias + h * self.o_bias + (2 * i + h) * self.mlp_bias)

    @property
    def layer_params(self) -> int:
        """One decoder layer: q,o (h x h), k,v (h x kv), gate/up/down (h x i), two RMSNorm weights, biases."""
        h = self.hidden_size
        return 2 * h * h + 2 * h * self.kv_dim + 3 * h * self.intermediate_size + 2 * h + self.layer_bias_params

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def total_params(self) -> int:
        """Every trainable parameter, a tied lm_head counted once (what optimizers and DeepSpeed count)."""
        head = 0 if self.tie_word_embeddings else self.embedding_params
        return self.embedding_params + self.num_hidden_layers * self.layer_params + self.hidden_size + head

    @property
    def matmul_params(self) -> int:
        """Parameters used in a matmul per token: all but the embedding lookup and the norm weights.

        This is the N of the 6N FLOPs rule (the lm_head matmul is real work, the lookup is not).
        """
        h = self.hidden_size
        layer = self.layer_params - 2 * h - self.layer_bias_params
        return self.num_hidden_layers * layer + self.embedding_params

    @property
    def largest_module_params(self) -> int:
        """The biggest single submodule (embedding / lm_head here): what ZeRO-3 must gather at once."""
        h = self.hidden_size
        return max(self.embedding_params, h * self.intermediate_size, h * h)


def _hf_config(path: str | None) -> Mapping[str, Any]:
    if not path:
        return {}
    file = Path(path).expanduser() / "config.json"
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"model.path={path}: cannot read config.json: {exc}") from exc


def family_biases(model_type: str | None, config: Mapping[str, Any]) -> dict[str, bool]:
    """Which projections carry a bias, from a config (config.json's dict, or a preset's keys)."""
    attention_bias = bool(config.get("attention_bias") or False)
    return {"qkv_bias": attention_bias or model_type in QKV_BIAS_FAMILIES, "o_bias": attention_bias,
            "mlp_bias": bool(config.get("mlp_bias") or False)}


def model_type_of(architecture: str | None) -> str | None:
    """transformers' model_type of a config class name (`Qwen2Config` -> `qwen2`), without importing it."""
    return architecture.removesuffix("Config").lower() if architecture else None


def _tokenizer_vocab(model_cfg: Any) -> int | None:
    """Vocabulary size from the run's tokenizer.json (the packaged one when none is named)."""
    from vicuna_exp.data.tokenizer import VOCABULARY_PREFIX, tokenizer_dir

    candidates = [d for d in (model_cfg.tokenizer, model_cfg.path) if d] or [str(PACKAGED_TOKENIZER_DIR)]
    for directory in candidates:
        if str(directory).startswith(VOCABULARY_PREFIX):
            directory = tokenizer_dir(str(directory))
        file = Path(directory).expanduser() / "tokenizer.json"
        if file.is_file():
            from tokenizers import Tokenizer

            return int(Tokenizer.from_file(str(file)).get_vocab_size(with_added_tokens=True))
    return None


def model_facts(model_cfg: Any, *, on_cuda: bool = False, precision: str = Precision.fp32) -> ModelFacts:
    """Facts of the model a run will train, from the files it will load where they exist.

    A pretrained model is built from `model.path`'s config.json, so its facts come from there
    (a preset's facts describe the model it names, not the directory it is pointed at); the
    preset's values are used only when there is no config.json to read. A random-init model is
    built from the preset's facts. Raises UsageError naming whatever is still missing.
    """
    hf = _hf_config(model_cfg.path) if str(getattr(model_cfg.init, "value", model_cfg.init)) == "pretrained" else {}
    keys = REQUIRED + ("num_key_value_heads", "tie_word_embeddings", "sliding_window")
    values: dict[str, Any] = {}
    for key in keys:
        preset = model_cfg[key] if key in model_cfg else None
        values[key] = hf[key] if hf.get(key) is not None else preset
    if hf:
        source = f"facts from {Path(str(model_cfg.path)).expanduser() / 'config.json'}"
    elif model_cfg.path:
        source = f"preset facts of model={model_cfg.name}: no config.json in model.path"
    else:
        source = f"preset facts of model={model_cfg.name}"
    if values["vocab_size"] is None:
        values["vocab_size"] = _tokenizer_vocab(model_cfg)
    missing = [k for k in REQUIRED if values[k] is None]
    if missing:
        names = ", ".join(f"model.{k}" for k in missing)
        raise UsageError(
            f"plan: model '{model_cfg.name}' lacks the architecture facts {names}; set them in "
            f"conf/model/{model_cfg.name}.yaml or on the command line (e.g. model.hidden_size=4096), "
            f"or point model.path at a local model directory with a config.json")
    for key in REQUIRED:
        if int(values[key]) <= 0:
            raise UsageError(f"model.{key}: must be a positive integer, got {values[key]}")
    h, heads = int(values["hidden_size"]), int(values["num_attention_heads"])
    if h % heads:
        raise UsageError(f"model.hidden_size: {h} is not divisible by model.num_attention_heads={heads}")
    kv = int(values["num_key_value_heads"] or heads)
    if heads % kv:
        raise UsageError(f"model.num_key_value_heads: {kv} does not divide model.num_attention_heads={heads}")
    attn = AttnImpl(model_cfg.attn_implementation)
    # auto as the trainer resolves it; a named kernel is planned as named (the plan may be for another
    # machine: the job's own check asks that machine's packages)
    choice = (resolve_attention(attn, probe_attention(on_cuda=on_cuda, precision=precision)) if attn == AttnImpl.auto
              else AttentionChoice(attn))
    arch = model_cfg.architecture if "architecture" in model_cfg else None
    biases = family_biases(hf.get("model_type") or model_type_of(arch), hf)
    window = values["sliding_window"] if hf.get("use_sliding_window", True) else None  # Qwen2 switches it off
    return ModelFacts(
        name=str(model_cfg.name),
        vocab_size=int(values["vocab_size"]),
        hidden_size=h,
        intermediate_size=int(values["intermediate_size"]),
        num_hidden_layers=int(values["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=kv,
        tie_word_embeddings=bool(values["tie_word_embeddings"]),
        **biases,
        sliding_window=int(window) if window else None,
        attn_implementation=choice.impl,
        attn_reason=choice.reason,
        gradient_checkpointing=bool(model_cfg.gradient_checkpointing),
        source=source,
    )
