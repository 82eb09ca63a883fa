"""Writing one Hugging Face model (safetensors shards + index + config) tensor by tensor.

Neither the end-of-training export nor `vicuna-exp export CHECKPOINT_DIR OUT_DIR` ever holds the
whole model: tensors arrive one at a time (gathered from the shards of a live run, or read from a
checkpoint on disk), are cast to the export dtype, and are flushed to a shard file once
`max_shard_bytes` have accumulated. The usual failure of the reference code, running out of
memory while gathering the full fp32 model to save it, cannot happen here.

    vicuna-exp export outputs/runs/DAY/TIME/checkpoints/step_00000120 exported/
    vicuna-exp export outputs/runs/DAY/TIME exported/      # the run's latest complete checkpoint
    vicuna-exp export outputs/runs/DAY/TIME adapter/ --adapter   # finetune=lora or qlora: the peft adapter alone

A checkpoint of an adapter method holds the adapters only: the base is rebuilt from the run's
`model.path` (or its seed, for a random-init base, on the CPU) and the adapters are merged into it;
a 4-bit base (qlora) is rebuilt in 4 bits and merged dequantised, as the run's own final/ is.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from transformers import GenerationConfig

from vicuna_exp.checkpoint import (
    CHECKPOINTS_DIR,
    DCP_SUBDIR,
    DEEPSPEED_SUBDIR,
    STATE_FILE,
    complete_checkpoints,
)
from vicuna_exp.data.chat_template import to_jinja
from vicuna_exp.data.template import with_special_tokens
from vicuna_exp.data.tokenizer import load_tokenizer, token_ids
from vicuna_exp.errors import EXIT_OK, UsageError
from vicuna_exp.finetune import is_peft_model, merged_model, merged_names, merged_tensors
from vicuna_exp.model import causal_lm_class_name, make_model_spec, tied_parameter_names
from vicuna_exp.quantize import dequantized, is_quantized
from vicuna_exp.rundir import RESOLVED_CONFIG, load_resolved_config

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
FINAL_ADAPTER_DIR = "final_adapter"  # beside final/: the adapter of an adapter method (peft's layout)
DTYPES = ("bf16", "fp16", "fp32")


def torch_dtype(name: str) -> Any:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


class ShardedSafetensorsWriter:
    """Collects tensors and writes them as `model-0000i-of-0000N.safetensors` plus the index.

    Only the process that writes creates one. `peak_bytes` is the most tensor memory it ever held
    at once (its buffer plus the tensor being added), which tests compare with the model size.
    """

    def __init__(self, out_dir: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._buffer: dict[str, Any] = {}
        self._buffer_bytes = 0
        self._files: list[tuple[str, list[str]]] = []  # temporary file name, tensor names
        self.total_bytes = 0
        self.peak_bytes = 0

    def add(self, name: str, tensor: Any) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor.detach().to("cpu").contiguous()
        self._buffer_bytes += nbytes
        self.total_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self._buffer_bytes)

    def _flush(self) -> None:
        if not self._buffer:
            return
        tmp = f".part-{len(self._files):05d}.safetensors"
        save_file(self._buffer, str(self.out_dir / tmp), metadata={"format": "pt"})
        self._files.append((tmp, list(self._buffer)))
        self._buffer, self._buffer_bytes = {}, 0

    def close(self) -> list[str]:
        """Name the shard files now that their number is known, then write the index. Returns file names."""
        self._flush()
        n = len(self._files)
        if n == 0:
            raise ValueError("no tensors were written")
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for (tmp, tensors), final in zip(self._files, names, strict=True):
            os.replace(self.out_dir / tmp, self.out_dir / final)
            weight_map.update({t: final for t in tensors})
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names


def write_tensors(items: Iterable[tuple[str, Any]], out_dir: Path, dtype: Any, *, is_writer: bool,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> ShardedSafetensorsWriter | None:
    """Consume (name, full tensor or None) pairs; the writer casts and buffers, the others only iterate.

    Every rank must iterate `items` to the end: gathering a sharded tensor is a collective.
    """
    writer = ShardedSafetensorsWriter(out_dir, max_shard_bytes) if is_writer else None
    for name, tensor in items:
        if writer is not None and tensor is not None:
            writer.add(name, tensor.to(dtype))
    if writer is not None:
        writer.close()
    return writer


def export_shard_bytes(cfg: Any) -> int:
    """Largest safetensors file of an export (`trainer.export_shard_mb`)."""
    return int(cfg.trainer.export_shard_mb) * 2**20


def write_hf_config(hf_config: Any, out_dir: Path, dtype_name: str) -> None:
    """config.json and generation_config.json, as `save_pretrained` would, for the export dtype."""
    config = copy.deepcopy(hf_config)
    if not getattr(config, "architectures", None):  # a random-init model: the class its config builds
        config.architectures = [causal_lm_class_name(config)]
    config.use_cache = True  # training turned it off; generation wants it on
    config.save_pretrained(str(out_dir))
    path = Path(out_dir) / "config.json"
    data = json.loads(path.read_text())
    data["dtype"] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype_name]
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    GenerationConfig.from_model_config(config).save_pretrained(str(out_dir))


def export_module(module: Any, tensors: Any, out_dir: Path, dtype: Any, cfg: Any, *, is_writer: bool,
                  max_shard_bytes: int | None = None, dtype_name: str | None = None, gather: Any = None) -> Any:
    """The export every backend shares: each parameter once (a tied lm_head is dropped), shard files
    with their index, and config.json. `tensors(names)` yields (name, full tensor) one at a time,
    with None on ranks that do not write; returns the writer (None on those ranks).

    A sharded adapter model passes `gather(param)` (one parameter whole, a collective) instead: it
    is merged layer by layer as it is written (`finetune.merged_tensors`), so no rank holds more
    than one layer's weights and adapters at once."""
    if gather is not None and is_peft_model(module):
        names = set(drop_tied(merged_names(module), module.config))
        items = merged_tensors(module, names, gather)
    else:
        names = set(drop_tied([n for n, _ in module.named_parameters()], module.config))
        items = tensors(names)
    writer = write_tensors(items, out_dir, dtype, is_writer=is_writer,
                           max_shard_bytes=max_shard_bytes or export_shard_bytes(cfg))
    if writer is not None:
        write_hf_config(module.config, out_dir, dtype_name or str(cfg.trainer.export_dtype))
    return writer


def export_whole(module: Any, out_dir: Path, dtype: Any, cfg: Any, *, max_shard_bytes: int | None = None,
                 dtype_name: str | None = None) -> ShardedSafetensorsWriter | None:
    """`final/` from a model this process holds whole (single, DDP, a checkpoint rebuilt on the CPU),
    with the adapters folded in. A 4-bit base (finetune=qlora) is dequantised one layer at a time
    and merged in fp32 before the cast to `dtype`: the merge of the dequantised base, which differs
    from the bf16 base by the quantisation error. Otherwise peft's merge (the model is spent after)."""
    if is_quantized(cfg.finetune):
        return export_module(module, None, out_dir, dtype, cfg, is_writer=True, max_shard_bytes=max_shard_bytes,
                             dtype_name=dtype_name, gather=lambda p: dequantized(p).float())
    model = merged_model(module)
    return export_module(model, local_tensors(model), out_dir, dtype, cfg, is_writer=True,
                         max_shard_bytes=max_shard_bytes, dtype_name=dtype_name)


def local_tensors(module: Any) -> Any:
    """`tensors` for export_module when this rank already holds whole tensors (single, DDP)."""
    return lambda names: ((n, p.detach()) for n, p in module.named_parameters() if n in names)


def drop_tied(names: list[str], hf_config: Any) -> list[str]:
    """Tied weights are stored once, under the name of the one they are tied to, as in HF checkpoints.
    Which names are tied is the model class's own knowledge (`_tied_weights_keys`), for any family."""
    if not getattr(hf_config, "tie_word_embeddings", False):
        return names
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    tied = tied_parameter_names(MODEL_FOR_CAUSAL_LM_MAPPING.get(type(hf_config), None))
    return [n for n in names if n not in tied]


# --------------------------------------------------------------------------------------------
# Reading checkpoints on disk, one tensor at a time
# --------------------------------------------------------------------------------------------
def _natural_key(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def dcp_model_tensors(state_dir: Path, names_filter: Any = None) -> Iterator[tuple[str, Any]]:
    """Model tensors of a torch.distributed.checkpoint directory (saved as {"model": ..., "optim": ...}).

    Each tensor is read alone (a partial load), so memory holds one tensor at a time whatever the
    number of ranks that wrote the checkpoint.
    """
    reader = dcp.FileSystemReader(str(state_dir))
    meta = reader.read_metadata().state_dict_metadata
    names = sorted((k.removeprefix("model.") for k, v in meta.items()
                    if k.startswith("model.") and isinstance(v, TensorStorageMetadata)), key=_natural_key)
    if names_filter is not None:
        names = names_filter(names)
    for name in names:
        md = meta[f"model.{name}"]
        tensor = torch.empty(md.size, dtype=md.properties.dtype)
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"model": {name: tensor}}, storage_reader=dcp.FileSystemReader(str(state_dir)),
                     planner=DefaultLoadPlanner(allow_partial_load=True), no_dist=True)
        yield name, tensor


def deepspeed_model_tensors(ds_root: Path, tag: str, names_filter: Any = None) -> Iterator[tuple[str, Any]]:
    """fp32 master weights of a DeepSpeed ZeRO-2/3 checkpoint, merged one parameter at a time.

    DeepSpeed's lazy mode memory-maps the per-rank files and concatenates a parameter's
    partitions only when asked, so no full copy of the model is built.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    lazy = get_fp32_state_dict_from_zero_checkpoint(str(ds_root), tag=tag, lazy_mode=True)
    names = list(lazy)
    if names_filter is not None:
        names = names_filter(names)
    for name in names:
        value = lazy[name]
        yield name, value.contiguous() if hasattr(value, "contiguous") else value


# --------------------------------------------------------------------------------------------
# `vicuna-exp export CHECKPOINT_DIR OUT_DIR`
# --------------------------------------------------------------------------------------------
def find_checkpoint(path: Path) -> Path:
    """A step directory itself, or the latest complete one under a run dir or its checkpoints/ dir."""
    if not path.is_dir():
        raise UsageError(f"CHECKPOINT_DIR={path}: no such directory")
    if (path / STATE_FILE).is_file():
        return path
    for root in (path / CHECKPOINTS_DIR, path):
        done = complete_checkpoints(root)
        if done:
            return done[-1]
    raise UsageError(f"CHECKPOINT_DIR={path}: no complete checkpoint (a step_* dir with trainer_state.json) there")


def run_dir_of(ckpt: Path) -> Path:
    for candidate in (ckpt.parent.parent, ckpt.parent, ckpt):
        if (candidate / RESOLVED_CONFIG).is_file():
            return candidate
    raise UsageError(f"CHECKPOINT_DIR={ckpt}: cannot find the run's {RESOLVED_CONFIG} (expected in "
                     f"{ckpt.parent.parent}); the config tells which model and tokenizer to write")


def adapter_model_from_checkpoint(ckpt: Path, cfg: Any, spec: Any) -> Any:
    """The run's base (rebuilt: pretrained from model.path, or from the seed) with the checkpoint's
    trained adapters loaded, on the CPU in fp32."""
    from vicuna_exp.finetune import load_trainable

    if (ckpt / DCP_SUBDIR / ".metadata").is_file():
        tensors = dcp_model_tensors(ckpt / DCP_SUBDIR)
    elif (ckpt / DEEPSPEED_SUBDIR).is_dir():  # the trainable fp32 masters alone (frozen ones are not saved)
        tensors = deepspeed_model_tensors(ckpt, DEEPSPEED_SUBDIR)
    else:
        raise UsageError(f"CHECKPOINT_DIR={ckpt}: neither a {DCP_SUBDIR}/ (torch.distributed.checkpoint) "
                         f"nor a {DEEPSPEED_SUBDIR}/ (DeepSpeed) directory inside")
    torch.manual_seed(int(cfg.trainer.seed))  # a random-init base is rebuilt as the run built it (on the CPU)
    module = spec.build("cpu")
    n = load_trainable(module, tensors)
    trainable = sum(1 for p in module.parameters() if p.requires_grad)
    if n != trainable:
        raise UsageError(f"CHECKPOINT_DIR={ckpt}: holds {n} of the {trainable} trainable tensors of the "
                         f"finetune={cfg.finetune.name} model its config builds")
    return module


def export_checkpoint(ckpt: Path, out_dir: Path, *, dtype_name: str | None = None,
                      max_shard_bytes: int | None = None, adapter: bool = False) -> ShardedSafetensorsWriter | None:
    """Write `out_dir` (weights, config, tokenizer, chat template) from one checkpoint directory:
    the merged model, or with `adapter` the adapter alone (then None is returned)."""
    from vicuna_exp.finetune import save_adapter, uses_adapters

    cfg, _ = load_resolved_config(run_dir_of(ckpt))
    dtype_name = dtype_name or str(cfg.trainer.export_dtype)
    max_shard_bytes = max_shard_bytes or export_shard_bytes(cfg)
    tok_key = "model.tokenizer" if cfg.model.tokenizer else "model.path"
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path, key=tok_key)
    spec = make_model_spec(cfg.model, vocab_size=len(tokenizer), device=torch.device("cpu"), precision="fp32",
                           finetune=cfg.finetune, token_ids=token_ids(tokenizer), seed=int(cfg.trainer.seed))
    if adapter and not uses_adapters(cfg.finetune):
        raise UsageError(f"--adapter: {ckpt} is of a finetune={cfg.finetune.name} run, which has no adapter")
    if uses_adapters(cfg.finetune):
        module = adapter_model_from_checkpoint(ckpt, cfg, spec)
        out_dir.mkdir(parents=True, exist_ok=True)
        if adapter:
            save_adapter(module, out_dir, cfg.model.path)
            write_tokenizer_files(cfg, tokenizer, out_dir)
            return None
        writer = export_whole(module, out_dir, torch_dtype(dtype_name), cfg, max_shard_bytes=max_shard_bytes,
                              dtype_name=dtype_name)
        write_tokenizer_files(cfg, tokenizer, out_dir)
        return writer

    def keep(names: list[str]) -> list[str]:
        return drop_tied(names, spec.hf_config)

    if (ckpt / DCP_SUBDIR / ".metadata").is_file():
        tensors = dcp_model_tensors(ckpt / DCP_SUBDIR, keep)
    elif (ckpt / DEEPSPEED_SUBDIR).is_dir():
        tensors = deepspeed_model_tensors(ckpt, DEEPSPEED_SUBDIR, keep)
    else:
        raise UsageError(f"CHECKPOINT_DIR={ckpt}: neither a {DCP_SUBDIR}/ (torch.distributed.checkpoint) "
                         f"nor a {DEEPSPEED_SUBDIR}/ (DeepSpeed) directory inside")
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = write_tensors(tensors, out_dir, torch_dtype(dtype_name), is_writer=True, max_shard_bytes=max_shard_bytes)
    assert writer is not None
    write_hf_config(spec.hf_config, out_dir, dtype_name)
    write_tokenizer_files(cfg, tokenizer, out_dir)
    return writer


def write_tokenizer_files(cfg: Any, tokenizer: Any, out_dir: Path) -> None:
    """The tokenizer with the training chat template, and the template as YAML, beside the weights."""
    template = with_special_tokens(cfg.template, tokenizer)  # the YAML records the tokens actually used
    tokenizer.chat_template = to_jinja(template, tokenizer)
    tokenizer.save_pretrained(str(out_dir))
    (Path(out_dir) / "vicuna_template.yaml").write_text(OmegaConf.to_yaml(template))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vicuna-exp export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint_dir", type=Path, help="a checkpoints/step_* dir, or a run dir (latest checkpoint)")
    parser.add_argument("out_dir", type=Path, help="where to write the Hugging Face model")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: the run's trainer.export_dtype")
    parser.add_argument("--adapter", action="store_true",
                        help="finetune=lora and qlora runs: write the peft adapter alone (default: the merged model)")
    parser.add_argument("--max-shard-mb", type=int, default=None,
                        help="largest safetensors file (default: the run's trainer.export_shard_mb)")
    args = parser.parse_args(argv)
    ckpt = find_checkpoint(args.checkpoint_dir)
    if args.out_dir.exists() and any(args.out_dir.iterdir()):
        raise UsageError(f"OUT_DIR={args.out_dir}: exists and is not empty; choose a new directory")
    shard = args.max_shard_mb * 2**20 if args.max_shard_mb else None
    writer = export_checkpoint(ckpt, args.out_dir, dtype_name=args.dtype, max_shard_bytes=shard, adapter=args.adapter)
    size = f" ({writer.total_bytes / 2**20:.1f} MiB)" if writer is not None else " (adapter)"
    print(f"exported {ckpt} -> {args.out_dir}{size}", file=sys.stderr)
    return EXIT_OK
