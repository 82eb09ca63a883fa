"""The fine-tuning method (`finetune=`): which parameters train, and how an adapter is added,
saved and merged. LoRA goes through peft; `full` leaves the model as it is.

A LoRA model is the base (frozen, `requires_grad=False`) with peft's adapter layers inside, so the
optimizer, gradient clipping and the checkpoints, which all take the parameters that require a
gradient, hold the adapters only. The frozen base is rebuilt from `model.path` (or from the seed,
for a random-init base) whenever it is needed: on resume, and when exporting from a checkpoint.

The adapters' initial values come from their own generator seeded by `trainer.seed`, drawn on the
CPU at full size exactly as peft's `reset_lora_parameters` draws them (A: kaiming-uniform, B: zero),
so a backend that creates them on the meta device and shards them (fsdp, deepspeed) fills its
shards with the values `single` starts from. peft renames what it wraps (`X.base_layer.weight`,
`X.original_module.weight`, `X.modules_to_save.default.weight`); `base_name` maps a parameter back
to the name it has in the base model's checkpoint, and `merged_tensors` folds each adapted layer
into its base weight one layer at a time, for an export under sharding.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from vicuna_exp.choices import FinetuneMethod
from vicuna_exp.errors import UsageError

ALL_LINEAR = "all-linear"  # peft's name for every linear layer of the decoder blocks (not the LM head)
ADAPTER_CONFIG = "adapter_config.json"  # what peft's save_pretrained writes beside the adapter weights
ADAPTER_NAME = "default"  # peft's name for the one adapter a run trains
PEFT_PREFIX = "base_model.model."  # where PeftModel puts the wrapped model's own names
# peft's wrapper levels inside a name: the wrapped layer, and a module trained in full beside the adapters
_WRAPPERS = re.compile(rf"\.(base_layer|original_module|modules_to_save\.{ADAPTER_NAME})(?=\.)")


def uses_adapters(finetune: Any) -> bool:
    """True when the method trains adapters on a frozen base (anything but `full`)."""
    return finetune is not None and FinetuneMethod(finetune.name) != FinetuneMethod.full


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """The distinct names (last component) of the model's linear layers: what `target_modules` matches."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def _module_name_of(model: torch.nn.Module, module: torch.nn.Module | None) -> str | None:
    for name, m in model.named_modules():
        if m is module:
            return name.rsplit(".", 1)[-1]
    return None


def check_targets(model: torch.nn.Module, finetune: DictConfig) -> None:
    """Every named target module must match a linear layer of this model (by name suffix, as peft
    matches). Runs on the meta-device model before any work starts, so a miss is usage (exit 2)."""
    if not uses_adapters(finetune):
        return
    targets = list(finetune.target_modules)
    if targets == [ALL_LINEAR]:
        return
    names = linear_layer_names(model)
    missing = [t for t in targets if t == ALL_LINEAR or t not in names]
    if missing:
        why = f"{ALL_LINEAR} stands alone" if ALL_LINEAR in missing else "match no linear layer"
        raise UsageError(f"finetune.target_modules: {', '.join(missing)} {why}; this model's linear layers: "
                         f"{', '.join(names)} (or [{ALL_LINEAR}])")


def lora_config(model: torch.nn.Module, finetune: DictConfig) -> Any:
    """peft's LoraConfig from the `finetune` section; `train_embeddings` and `train_lm_head` add the
    model's own embedding modules to `modules_to_save` (trained in full)."""
    from peft import LoraConfig, TaskType

    targets = list(finetune.target_modules)
    save = [name for flag, module in ((finetune.train_embeddings, model.get_input_embeddings()),
                                      (finetune.train_lm_head, model.get_output_embeddings()))
            if flag and (name := _module_name_of(model, module))]
    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=int(finetune.r), lora_alpha=float(finetune.lora_alpha),
                      lora_dropout=float(finetune.lora_dropout),
                      target_modules=ALL_LINEAR if targets == [ALL_LINEAR] else targets,
                      modules_to_save=save or None, use_dora=bool(finetune.use_dora),
                      use_rslora=bool(finetune.use_rslora), bias="none")


def add_adapters(model: torch.nn.Module, finetune: DictConfig | None, seed: int = 0) -> torch.nn.Module:
    """The model to train: itself for `full`, else a peft model whose base is frozen. Adapter
    weights are kept in fp32 whatever the base's dtype (peft's autocast_adapter_dtype) and start
    from `initial_adapters(.., seed)`; on the meta device they are placeholders that the backend
    fills after materialising its shards. The global RNG is left as it was."""
    if not uses_adapters(finetune):
        return model
    from peft import get_peft_model

    check_targets(model, finetune)
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        # peft asks transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        peft_model = get_peft_model(model, lora_config(model, finetune), autocast_adapter_dtype=True)
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, value in initial_adapters(peft_model, seed).items():
            if params[name].device.type != "meta":
                params[name].copy_(value.to(params[name].device, params[name].dtype))
    return peft_model


def is_adapter_parameter(name: str) -> bool:
    """A LoRA matrix (A or B) or a DoRA magnitude: what the base checkpoint does not hold."""
    return ".lora_" in name


def initial_adapters(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Every LoRA matrix's initial value, full size, fp32 on the CPU, by parameter name: A drawn
    kaiming-uniform (a=sqrt(5)) and B zero, as peft's `reset_lora_parameters` does with
    `init_lora_weights=True`, from one generator seeded by `seed`, in parameter order. The same on
    every backend and every rank, whatever the device or the sharding of the parameters."""
    g = torch.Generator().manual_seed(int(seed))
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            shape = tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 keeps the real shape aside
            value = torch.zeros(shape, dtype=torch.float32)
            if ".lora_A." in name and name.endswith(".weight"):
                torch.nn.init.kaiming_uniform_(value, a=math.sqrt(5), generator=g)
            out[name] = value
    return out


def base_name(name: str) -> str:
    """The name a parameter of a (peft) model has in the base model's Hugging Face checkpoint."""
    return _WRAPPERS.sub("", name.removeprefix(PEFT_PREFIX))


def merged_names(module: torch.nn.Module) -> list[str]:
    """The parameter names of the merged model (`merge_and_unload`'s), in the module's order."""
    if not is_peft_model(module):
        return [n for n, _ in module.named_parameters()]
    return [base_name(n) for n, _ in module.named_parameters()
            if not is_adapter_parameter(n) and ".original_module." not in n]


def merged_tensors(module: torch.nn.Module, names: set[str],
                   gather: Callable[[torch.nn.Parameter], torch.Tensor | None]) -> Iterator[tuple[str, Any]]:
    """(merged name, full tensor) for each name in `names`, one layer at a time: an adapted weight
    is W + scaling * B @ A, added in W's dtype as peft's safe merge adds it. `gather(param)` returns
    the whole tensor (None on ranks that do not write) and may be a collective: every rank calls it
    for the same parameters in the same order."""
    from peft.tuners.lora import LoraLayer

    layers = {name: m for name, m in module.named_modules() if isinstance(m, LoraLayer)}
    for name, p in module.named_parameters():
        if is_adapter_parameter(name) or ".original_module." in name or base_name(name) not in names:
            continue
        owner = name.rsplit(".base_layer.", 1)[0] if ".base_layer." in name else None
        layer = layers.get(owner) if owner is not None else None
        weight = gather(p)
        if layer is not None and name.endswith(".base_layer.weight") and ADAPTER_NAME in layer.lora_A:
            if getattr(layer, "use_dora", {}).get(ADAPTER_NAME):
                raise NotImplementedError("merging a DoRA adapter under sharding")
            a, b = gather(layer.lora_A[ADAPTER_NAME].weight), gather(layer.lora_B[ADAPTER_NAME].weight)
            if weight is not None:
                delta = (b.float() @ a.float()) * layer.scaling[ADAPTER_NAME]
                if layer.fan_in_fan_out:
                    delta = delta.T
                weight = weight.clone()
                weight += delta
        yield base_name(name), weight


def is_peft_model(module: Any) -> bool:
    from peft import PeftModel

    return isinstance(module, PeftModel)


def save_adapter(module: Any, out_dir: Path, base_path: str | None,
                 state: dict[str, torch.Tensor] | None = None) -> None:
    """`final_adapter/`: adapter_config.json plus the adapter's safetensors, loadable with
    `PeftModel.from_pretrained(base, out_dir)`. The config names the base it was trained on.
    `state`: the trainable tensors gathered whole, for a sharded module (default: its own)."""
    extra = {"state_dict": state} if state is not None else {}
    module.save_pretrained(str(out_dir), safe_serialization=True, **extra)
    path = Path(out_dir) / ADAPTER_CONFIG
    data = json.loads(path.read_text())
    data["base_model_name_or_path"] = str(Path(base_path).expanduser().resolve()) if base_path else None
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def merged_model(module: Any) -> torch.nn.Module:
    """The base with the adapters folded into its weights, as a plain transformers model (in place:
    the adapter model is spent afterwards, so this is the last thing a run does with it)."""
    if not is_peft_model(module):
        return module
    return module.merge_and_unload(safe_merge=True)


def adapter_base(adapter_dir: Path) -> str | None:
    """The base model directory an adapter names (`base_model_name_or_path`), or None."""
    try:
        data = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{adapter_dir}: not a peft adapter ({ADAPTER_CONFIG} unreadable: {e})") from None
    return data.get("base_model_name_or_path") or None


def check_adapter_base(adapter_dir: Path, model_path: str | None, key: str = "model.path") -> None:
    """An adapter trained on another base must not be loaded on this one: usage, naming both."""
    base = adapter_base(adapter_dir)
    if model_path is None or base is None:
        return
    if Path(base).expanduser().resolve() != Path(model_path).expanduser().resolve():
        raise UsageError(f"{adapter_dir} is an adapter of {base}, but {key}={model_path}: "
                         f"set {key}={base}, or use the merged model (final/)")


def load_trainable(module: torch.nn.Module, tensors: Any) -> int:
    """Copy (name, tensor) pairs of a checkpoint's trainable state into an adapter model; every name
    must be one of its parameters. Returns how many were loaded."""
    params = dict(module.named_parameters())
    n = 0
    for name, tensor in tensors:
        if name not in params:
            raise UsageError(f"checkpoint tensor {name} is not a parameter of the adapter model built from the "
                             f"run's config (finetune section changed?)")
        with torch.no_grad():
            params[name].copy_(tensor.to(params[name].dtype))
        n += 1
    return n
