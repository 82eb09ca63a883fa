"""Which model to build, and how: architecture, attention kernel, checkpointing, dtype.

Backends decide *where* the weights live (one device, sharded, offloaded); this module only
says what the model is, so a `ModelSpec` can be built on a real device or on the meta device.
Any Hugging Face causal LM goes through the same path: a pretrained one by AutoConfig and
AutoModelForCausalLM, a random-init one from the config class `model.architecture` names
(LlamaConfig, MistralConfig, Qwen2Config, ...). What differs between families (the decoder-layer
class to shard, the tied weights, the class to export as) is read from the model's own classes.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from vicuna_exp import hardware
from vicuna_exp.attention import check_varlen, register_varlen
from vicuna_exp.choices import AttnImpl, ModelInit, Precision
from vicuna_exp.data.tokenizer import LLAMA_TOKEN_IDS, TokenIds
from vicuna_exp.errors import UsageError
from vicuna_exp.finetune import add_adapters, check_targets, uses_adapters
from vicuna_exp.hardware import AttentionChoice, probe_attention, resolve_attention
from vicuna_exp.quantize import is_quantized, load_quantized, quantize_in_place

log = logging.getLogger(__name__)


def resolve_attn_implementation(requested: str, device: torch.device, precision: str) -> AttentionChoice:
    """The planner's rule (`hardware.resolve_attention`) with this rank's device: transformers raises
    instead of falling back, so a kernel that cannot run here is refused before anything is built."""
    return resolve_attention(requested, probe_attention(on_cuda=device.type == "cuda", precision=precision))


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

    hf_config: Any  # a transformers config (LlamaConfig, Qwen2Config, ... or the pretrained model's own)
    init: ModelInit
    path: Path | None
    gradient_checkpointing: bool
    param_dtype: torch.dtype  # dtype the weights are stored in during training (a frozen base: its own)
    finetune: Any = None  # the `finetune` section: which parameters train (None: all)
    seed: int = 0  # the adapters' initial values are drawn from it (`finetune.initial_adapters`)
    attn_reason: str = hardware.NAMED_ATTENTION  # or why `auto` picked hf_config's kernel

    def build(self, device: torch.device | str) -> torch.nn.Module:
        """A ready model on `device`, adapters added; pretrained weights are read straight from model.path."""
        from transformers import AutoModelForCausalLM

        if self.quantized:
            return self.adapt(self.build_quantized(torch.device(device)))
        if self.init == ModelInit.pretrained:
            # No device_map: that path goes through accelerate, which training does not use.
            model = AutoModelForCausalLM.from_pretrained(str(self.path), config=self.hf_config,
                                                         dtype=self.param_dtype).to(device)
        else:
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(self.hf_config, dtype=self.param_dtype)
        return self.adapt(self.finish(model))

    @property
    def quantized(self) -> bool:
        """The frozen base's decoder linears are held in 4 bits (`finetune=qlora`)."""
        return is_quantized(self.finetune)

    def build_quantized(self, device: torch.device) -> torch.nn.Module:
        """The base with its decoder linears in bitsandbytes 4-bit: a pretrained one quantised as
        its weights are read (never whole in 16 or 32 bits), a random-init one built from the seed
        as `finetune=lora` builds it, then quantised layer by layer."""
        if self.init == ModelInit.pretrained:
            model = self.build_meta()
            return load_quantized(model, decoder_layers(model, "finetune=qlora"), self.path, self.finetune,
                                  device, self.param_dtype)
        from transformers import AutoModelForCausalLM

        with torch.device(device):
            model = self.finish(AutoModelForCausalLM.from_config(self.hf_config, dtype=self.param_dtype))
        return quantize_in_place(model, decoder_layers(model, "finetune=qlora"), self.finetune, self.param_dtype)

    def adapt(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model to train, from the base with its weights in place: adapters for LoRA."""
        return add_adapters(model, self.finetune, self.seed)

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



def decoder_layers(model: torch.nn.Module, where: str) -> list[torch.nn.Module]:
    """The model's repeated blocks, by the classes its own `_no_split_modules` names (the unit
    Hugging Face never splits across devices: the decoder layer of every family).

    Raises UsageError naming what was looked for when none of those classes is in the model."""
    wanted = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in wanted]
    if not layers:
        looked = ", ".join(sorted(wanted)) or "nothing (the class declares no _no_split_modules)"
        raise UsageError(f"{where}: {type(model).__name__}._no_split_modules names {looked}, and the model "
                         "has no module of that class to shard")
    return layers


def causal_lm_class_name(hf_config: Any) -> str:
    """The causal-LM class transformers builds for this config (what `architectures` records)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(hf_config)].__name__
    except KeyError:
        raise UsageError(f"model: transformers has no causal LM for {type(hf_config).__name__}") from None


def tied_parameter_names(model_or_class: Any) -> set[str]:
    """Names of the parameters that are tied to another one and stored under that one's name
    (a tied lm_head), from the model class's own `_tied_weights_keys`."""
    keys = getattr(model_or_class, "_tied_weights_keys", None) or ()
    return set(keys)  # a dict (tied -> source) or a list of tied names, depending on the class


def config_class(architecture: str) -> type:
    """The transformers config class `model.architecture` names (UsageError naming it if unknown)."""
    import transformers
    from transformers import PretrainedConfig

    try:
        cls = getattr(transformers, architecture)
    except (AttributeError, ImportError, RuntimeError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, PretrainedConfig)) or cls is PretrainedConfig:
        raise UsageError(f"model.architecture={architecture}: not a config class of the installed transformers "
                         f"{transformers.__version__} (e.g. LlamaConfig, MistralConfig, Qwen2Config)")
    return cls


# Family features: model key -> the config field that must exist for the family to honour it.
FAMILY_FEATURES = {"rope_scaling": "rope_parameters", "sliding_window": "sliding_window"}


def random_init_config(model_cfg: DictConfig, *, vocab_size: int, attn: AttnImpl, token_ids: TokenIds) -> Any:
    """The Hugging Face config of a random-init model, from the option's architecture facts."""
    cls = config_class(str(model_cfg.architecture))
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    family = {}
    for key, field_name in FAMILY_FEATURES.items():
        value = model_cfg.get(key)
        if value is None:
            continue
        if field_name not in fields:  # passed anyway it would be stored and silently ignored
            raise UsageError(f"model.{key}: {cls.__name__} has no {field_name}; this family cannot apply it")
        family[key] = OmegaConf.to_container(value) if isinstance(value, DictConfig) else value
    try:
        return cls(
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
            bos_token_id=token_ids.bos,
            eos_token_id=token_ids.eos,
            pad_token_id=token_ids.pad,
            use_cache=False,
            attn_implementation=str(attn),
            **family,
        )
    except (TypeError, ValueError) as e:
        raise UsageError(f"model.architecture={model_cfg.architecture}: the facts of model={model_cfg.name} "
                         f"do not make a valid {cls.__name__}: {str(e).splitlines()[0]}") from None


def check_attention(attn: AttnImpl, hf_config: Any) -> None:
    """Refuse a kernel that would silently drop a family feature (a sliding window it cannot apply)."""
    window = getattr(hf_config, "sliding_window", None)
    uses_window = window is not None and "sliding_attention" in (getattr(hf_config, "layer_types", None)
                                                                 or ["sliding_attention"])
    if attn == AttnImpl.varlen:
        check_varlen(hf_config, window if uses_window else None)
    if attn == AttnImpl.flash_attention_2 and uses_window:
        import inspect

        from flash_attn import flash_attn_func

        if "window_size" not in inspect.signature(flash_attn_func).parameters:
            raise UsageError(f"model.attn_implementation=flash_attention_2: the installed flash-attn cannot apply "
                             f"the sliding window ({window}) of {type(hf_config).__name__}; use sdpa, or "
                             "flash-attn >= 2.3")


def make_model_spec(model_cfg: DictConfig, *, vocab_size: int, device: torch.device, precision: str,
                    finetune: DictConfig | None = None, token_ids: TokenIds = LLAMA_TOKEN_IDS,
                    seed: int = 0) -> ModelSpec:
    """What to build: a pretrained model's own config.json, or a random-init one from the option's
    facts (`token_ids`: the tokenizer's BOS, EOS and padding ids, recorded in the config). Under
    bf16_mixed a frozen base is stored in bf16 (it needs no fp32 master copy: nothing updates it);
    the adapters stay fp32."""
    from transformers import AutoConfig

    choice = resolve_attn_implementation(model_cfg.attn_implementation, device, precision)
    log.info("attention: %s (%s)", choice.impl, choice.reason)
    attn = choice.impl
    if attn == AttnImpl.varlen:
        register_varlen()
    bf16_base = precision == Precision.bf16 or (precision == Precision.bf16_mixed and uses_adapters(finetune))
    param_dtype = torch.bfloat16 if bf16_base else torch.float32
    if model_cfg.init == ModelInit.pretrained:
        path = check_model_dir(model_cfg.path)
        try:
            hf_config = AutoConfig.from_pretrained(str(path))
        except Exception as e:  # a config.json transformers cannot read, or an architecture it does not know
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UsageError(f"model.path={model_cfg.path}: config.json cannot be loaded ({first})") from None
        hf_config._attn_implementation = str(attn)
        hf_config.use_cache = False
        model_vocab = getattr(hf_config, "vocab_size", None)
        if model_vocab is not None and model_vocab < vocab_size:
            raise UsageError(f"model.tokenizer: the tokenizer has {vocab_size} tokens but model.path={model_cfg.path} "
                             f"has an embedding for {model_vocab}")
        check_attention(attn, hf_config)
        return ModelSpec(hf_config, ModelInit.pretrained, path, bool(model_cfg.gradient_checkpointing), param_dtype,
                         finetune, seed, choice.reason)
    hf_config = random_init_config(model_cfg, vocab_size=vocab_size, attn=attn, token_ids=token_ids)
    model_vocab = hf_config.vocab_size
    if model_vocab < vocab_size:
        raise UsageError(f"model.vocab_size: the tokenizer has {vocab_size} tokens but model={model_cfg.name} "
                         f"has an embedding for {model_vocab}")
    check_attention(attn, hf_config)
    return ModelSpec(hf_config, ModelInit.random, None, bool(model_cfg.gradient_checkpointing), param_dtype, finetune,
                     seed, choice.reason)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_facts_of(spec: ModelSpec, model_cfg: DictConfig) -> object:
    """The planner's view of the model actually built (FLOPs per token, parameter counts)."""
    from vicuna_exp.plan.facts import ModelFacts, family_biases

    c = spec.hf_config
    return ModelFacts(
        name=str(model_cfg.name), vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        **family_biases(getattr(c, "model_type", None), c.to_dict()),
        sliding_window=(getattr(c, "sliding_window", None) if getattr(c, "use_sliding_window", True) else None),
        attn_implementation=c._attn_implementation or "sdpa", attn_reason=spec.attn_reason,
        gradient_checkpointing=spec.gradient_checkpointing)
