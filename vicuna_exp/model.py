"""Which model to build, and how: architecture, attention kernel, checkpointing, dtype.

Backends decide *where* the weights live (one device, sharded, offloaded); this module only
says what the model is, so a `ModelSpec` can be built on a real device or on the meta device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from vicuna_exp import hardware
from vicuna_exp.choices import AttnImpl, ModelInit, Precision
from vicuna_exp.errors import UsageError
from vicuna_exp.finetune import add_adapters, check_targets, uses_adapters
from vicuna_exp.hardware import resolve_attention


def resolve_attn_implementation(requested: str, device: torch.device) -> AttnImpl:
    """`auto` = flash_attention_2 when it can run, else sdpa: transformers raises instead of falling back."""
    return resolve_attention(requested, on_cuda=device.type == "cuda")


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """The trainer's precision, by the planner's rule, with bf16 support asked of the device."""
    on_cuda = device.type == "cuda"
    return hardware.resolve_precision(requested, on_cuda=on_cuda,
                                      bf16_supported=on_cuda and torch.cuda.is_bf16_supported())


def check_model_dir(path: str, key: str = "model.path") -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise UsageError(f"{key}={path}: no such directory")
    if not (p / "config.json").is_file():
        raise UsageError(f"{key}={path}: not a Hugging Face model directory (no config.json)")
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        raise UsageError(f"{key}={path}: no weights (*.safetensors or *.bin) in the directory")
    return p


@dataclass
class ModelSpec:
    """Everything needed to build the model, on any device, the same way on every rank."""

    hf_config: object  # transformers.LlamaConfig (or the pretrained model's config)
    init: ModelInit
    path: Path | None
    gradient_checkpointing: bool
    param_dtype: torch.dtype  # dtype the weights are stored in during training (a frozen base: its own)
    finetune: Any = None  # the `finetune` section: which parameters train (None: all)

    def build(self, device: torch.device | str) -> torch.nn.Module:
        """A ready model on `device`, adapters added; pretrained weights are read straight from model.path."""
        from transformers import AutoModelForCausalLM

        if self.init == ModelInit.pretrained:
            # No device_map: that path goes through accelerate, which training does not use.
            model = AutoModelForCausalLM.from_pretrained(str(self.path), config=self.hf_config,
                                                         dtype=self.param_dtype).to(device)
        else:
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(self.hf_config, dtype=self.param_dtype)
        return self.adapt(self.finish(model))

    def adapt(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model to train, from the base with its weights in place: adapters for LoRA."""
        return add_adapters(model, self.finetune)

    def check_finetune(self) -> None:
        """The method fits this architecture (target modules exist), checked on the meta device."""
        if uses_adapters(self.finetune):
            check_targets(self.build_meta(), self.finetune)

    def build_meta(self) -> torch.nn.Module:
        """Parameters without storage, for backends that shard before they materialise."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(self.hf_config, dtype=self.param_dtype)
        return self.finish(model)

    def finish(self, model: torch.nn.Module) -> torch.nn.Module:
        model.config.use_cache = False  # with the cache on, packed rows attend across example boundaries
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        return model

    @property
    def decoder_layer_class(self) -> str:
        return "LlamaDecoderLayer"


def make_model_spec(model_cfg: DictConfig, *, vocab_size: int, device: torch.device, precision: str,
                    finetune: DictConfig | None = None) -> ModelSpec:
    """What to build. Under bf16_mixed a frozen base is stored in bf16 (it needs no fp32 master
    copy: nothing updates it); the adapters stay fp32."""
    from transformers import AutoConfig, LlamaConfig

    attn = resolve_attn_implementation(model_cfg.attn_implementation, device)
    bf16_base = precision == Precision.bf16 or (precision == Precision.bf16_mixed and uses_adapters(finetune))
    param_dtype = torch.bfloat16 if bf16_base else torch.float32
    if model_cfg.init == ModelInit.pretrained:
        path = check_model_dir(model_cfg.path)
        try:
            hf_config = AutoConfig.from_pretrained(str(path))
        except Exception as e:  # a config.json transformers cannot read
            raise UsageError(f"model.path={model_cfg.path}: config.json cannot be loaded ({e})") from None
        hf_config._attn_implementation = str(attn)
        hf_config.use_cache = False
        model_vocab = getattr(hf_config, "vocab_size", None)
        if model_vocab is not None and model_vocab < vocab_size:
            raise UsageError(f"model.tokenizer: the tokenizer has {vocab_size} tokens but model.path={model_cfg.path} "
                             f"has an embedding for {model_vocab}")
        return ModelSpec(hf_config, ModelInit.pretrained, path, bool(model_cfg.gradient_checkpointing), param_dtype,
                         finetune)
    hf_config = LlamaConfig(
        vocab_size=model_cfg.vocab_size or vocab_size,
        hidden_size=model_cfg.hidden_size,
        intermediate_size=model_cfg.intermediate_size,
        num_hidden_layers=model_cfg.num_hidden_layers,
        num_attention_heads=model_cfg.num_attention_heads,
        num_key_value_heads=model_cfg.num_key_value_heads or model_cfg.num_attention_heads,
        max_position_embeddings=model_cfg.max_position_embeddings,
        rms_norm_eps=model_cfg.rms_norm_eps,
        rope_theta=model_cfg.rope_theta,
        tie_word_embeddings=model_cfg.tie_word_embeddings,
        initializer_range=model_cfg.initializer_range,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        use_cache=False,
        attn_implementation=str(attn),
    )
    return ModelSpec(hf_config, ModelInit.random, None, bool(model_cfg.gradient_checkpointing), param_dtype, finetune)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_facts_of(spec: ModelSpec, model_cfg: DictConfig) -> object:
    """The planner's view of the model actually built (FLOPs per token, parameter counts)."""
    from vicuna_exp.plan.facts import ModelFacts

    c = spec.hf_config
    return ModelFacts(
        name=str(model_cfg.name), vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        attn_implementation=c._attn_implementation or "sdpa", gradient_checkpointing=spec.gradient_checkpointing)
