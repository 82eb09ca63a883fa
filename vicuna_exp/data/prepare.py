"""Raw ShareGPT data to a prepared, cached dataset: load, clean, encode, split, write, count.

`prepare` is what training calls (through the cache, so every sweep arm with the same data
settings shares one preparation); `main` is the `vicuna-exp prepare` task. A prepared directory is
a `datasets.DatasetDict` (`train`, `eval`; columns `input_ids`, `labels`, `length`,
`conversation_id`) with `stats.json` beside the splits, so `datasets.load_from_disk(DIR)` opens it.

    vicuna-exp prepare data=sharegpt data.path=/data/sharegpt.json context=2048 model.tokenizer=/models/llama-7b
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import platform
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vicuna_exp.data.config import CACHE_IRRELEVANT, DataConfig, TemplateConfig
from vicuna_exp.errors import UsageError

if TYPE_CHECKING:
    from datasets import Dataset
    from omegaconf import DictConfig
    from transformers import PreTrainedTokenizerFast

log = logging.getLogger("vicuna_exp.data")

PIPELINE_VERSION = 1  # bump when the code changes what a preparation contains


@dataclass
class PreparedData:
    path: Path  # the prepared directory (DatasetDict + stats.json)
    train: Dataset
    eval: Dataset
    stats: dict[str, Any]
    data_hash: str  # the cache key: raw data, settings, template, tokenizer, context
    from_cache: bool = False


def _as_dataclass(cfg: Any, cls: type) -> Any:
    """A section as its dataclass, whether given as the dataclass, a DictConfig or a dict."""
    if isinstance(cfg, cls):
        return cfg
    if not isinstance(cfg, dict):
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in cfg.items() if k in names})


def _key_parts(data: DataConfig, template: TemplateConfig, context: int, raw_hash: str, tok_hash: str) -> dict:
    settings = {k: v for k, v in dataclasses.asdict(data).items() if k not in CACHE_IRRELEVANT}
    return {"pipeline": PIPELINE_VERSION, "raw_data": raw_hash, "data": settings,
            "template": dataclasses.asdict(template), "tokenizer": tok_hash, "context": int(context)}


def prepare(
    data_cfg: Any,
    template_cfg: Any,
    context_length: int,
    tokenizer: PreTrainedTokenizerFast,
    tokenizer_dir: str | None,
) -> PreparedData:
    """The prepared dataset for these settings: from the cache, or built (once, under a lock) and cached."""
    from vicuna_exp.data import cache
    from vicuna_exp.data.clean import check_config
    from vicuna_exp.data.load import resolve_path
    from vicuna_exp.data.template import check_template

    data: DataConfig = _as_dataclass(data_cfg, DataConfig)
    template: TemplateConfig = _as_dataclass(template_cfg, TemplateConfig)
    check_config(data)
    check_template(template)
    if context_length < 8:
        raise UsageError(f"context.length: must be at least 8 tokens, got {context_length}")
    raw_path = resolve_path(data.path, data.package_file)
    parts = _key_parts(data, template, context_length, cache.file_hash(raw_path),
                       cache.tokenizer_hash(tokenizer, tokenizer_dir))
    key = cache.content_key(parts)
    root = cache.cache_root(data.cache_dir)
    name = f"{data.name}-c{context_length}"

    def build(tmp: Path) -> None:
        # Millions of small objects are created and none forms a cycle: the cyclic GC would only
        # rescan them over and over (a third of the load time on ShareGPT).
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            _build(tmp, raw_path, data, template, context_length, tokenizer, key, parts)
        finally:
            if was_enabled:
                gc.enable()

    def waiting() -> None:
        log.info("another job is preparing %s; waiting for it", name)

    path, built = cache.get_or_build(root, name, key, build, on_wait=waiting)
    prepared = open_prepared(path)
    prepared.from_cache = not built
    return prepared


def open_prepared(path: str | Path) -> PreparedData:
    """Open a prepared directory (memory-mapped: fast, whatever its size)."""
    from datasets import load_from_disk

    path = Path(path)
    stats = json.loads((path / "stats.json").read_text())
    dd = load_from_disk(str(path))
    return PreparedData(path, dd["train"], dd["eval"], stats, stats["data_hash"])


# ----------------------------------------------------------------------------------------- build


def _build(tmp: Path, raw_path: Path, data: DataConfig, template: TemplateConfig, context: int,
           tokenizer: PreTrainedTokenizerFast, key: str, parts: dict) -> None:
    from vicuna_exp.data.clean import DROP_REASONS, CleanResult, clean_stream, in_eval_split
    from vicuna_exp.data.encode import ConversationEncoder
    from vicuna_exp.data.load import iter_records
    from vicuna_exp.data.split import encode_and_split

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    # One pipelined pass: records are read and cleaned as the tokenizer's threads need them.
    raw, records = iter_records(raw_path, data.format, data.max_records)
    cleaned = CleanResult([], 0)
    encoder = ConversationEncoder(tokenizer, template)
    split = encode_and_split(clean_stream(records, data, cleaned, num_proc=data.num_proc or 1),
                             encoder, context, data.overflow)
    for note in raw.notes:
        log.warning("%s", note)
    convs = split.convs
    dropped: Counter = Counter({r: 0 for r in DROP_REASONS})
    dropped.update(cleaned.dropped)
    if not convs:
        raise UsageError(f"{raw_path}: nothing left after cleaning: {raw.count} records read, "
                         f"dropped {dict((k, v) for k, v in dropped.items() if v)}")
    is_eval = [in_eval_split(c.id, data.seed, data.eval_fraction) for c in convs]
    dropped.update(split.dropped)
    examples, source_tokens, alive = split.examples, split.source_tokens, split.alive
    overflow, dropped_examples = split.overflow, split.dropped_examples
    timings["read_clean_encode_split_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    splits: dict[str, list[int]] = {"train": [], "eval": []}
    for ci in range(len(convs)):
        if alive[ci]:
            splits["eval" if is_eval[ci] else "train"].append(ci)
    from datasets import DatasetDict
    from datasets.utils import logging as ds_logging

    dd = DatasetDict({name: _to_dataset([(convs[ci].id, ex) for ci in idx for ex in examples[ci]],
                                        _fingerprint(key, name))
                      for name, idx in splits.items()})
    bars = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        # one shard per split: datasets writes an empty split with zero shards and cannot reopen it
        dd.save_to_disk(str(tmp), num_shards={name: 1 for name in dd})
    finally:
        if bars:
            ds_logging.enable_progress_bar()
    timings["write_s"] = time.perf_counter() - t

    split_stats = {name: _split_stats(dd[name], [ci for ci in idx], source_tokens, data, context)
                   for name, idx in splits.items()}
    kept_records = int(alive.sum())
    dropped_total = {k: int(v) for k, v in dropped.items()}
    if raw.count != kept_records + sum(dropped_total.values()):
        raise RuntimeError(f"record accounting broke: {raw.count} read, {kept_records} kept, {dropped_total}")
    if kept_records == 0:
        raise UsageError(f"{raw_path}: no conversation fits after encoding and splitting at context {context} "
                         f"(dropped {dict((k, v) for k, v in dropped_total.items() if v)})")
    source = int(source_tokens[alive].sum())
    supervised = sum(s["supervised_tokens"] for s in split_stats.values())
    total = sum(s["total_tokens"] for s in split_stats.values())
    slots = sum(s["token_slots"] for s in split_stats.values())
    timings["total_s"] = time.perf_counter() - t0
    stats = {
        "input_records": raw.count,
        "kept_records": kept_records,
        "kept_examples": sum(s["kept_examples"] for s in split_stats.values()),
        "dropped": dropped_total,
        "source_assistant_tokens": source,
        "supervised_tokens": supervised,
        "total_tokens": total,
        "retention": supervised / source if source else 0.0,
        "packing_efficiency": total / slots if slots else 0.0,
        "context_length": context,
        "packing": data.packing,
        "overflow_policy": data.overflow,
        "overflow": {k: int(v) for k, v in sorted(overflow.items())},
        "dropped_examples": {k: int(v) for k, v in dropped_examples.items()},
        "cleaning": {k: int(v) for k, v in sorted(cleaned.changes.items())},
        "splits": split_stats,
        "source": {"path": str(raw_path), "format": raw.format, "records_read": raw.count,
                   "max_records": data.max_records, "truncated": raw.truncated, "notes": raw.notes},
        "data_hash": key,
        "key_parts": parts,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "conversations_per_s": raw.count / timings["total_s"] if timings["total_s"] else None,
        "created_by": {"pid": os.getpid(), "host": platform.node()},
    }
    (tmp / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n")


def _fingerprint(key: str, split: str) -> str:
    """The split's `datasets` fingerprint from the cache key, which already names its content: without
    one, `datasets` hashes every byte of the table through dill (a tenth of a cold preparation)."""
    import hashlib

    return hashlib.sha256(f"{key}:{split}".encode()).hexdigest()[:16]


def _to_dataset(rows: list[tuple[str, tuple[np.ndarray, np.ndarray]]], fingerprint: str | None = None) -> Dataset:
    """A Dataset built from arrays directly (no per-token Python objects)."""
    import pyarrow as pa
    from datasets import Dataset
    from datasets.table import InMemoryTable

    lengths = np.array([len(ex[0]) for _, ex in rows], dtype=np.int64)
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise UsageError("data: more than 2^31 tokens in one split; use data.max_records to prepare less")
    off = pa.array(offsets.astype(np.int32), type=pa.int32())

    def column(which: int) -> Any:
        flat = np.concatenate([ex[which] for _, ex in rows], dtype=np.int32) if rows else np.zeros(0, np.int32)
        return pa.ListArray.from_arrays(off, pa.array(flat, type=pa.int32()))

    table = pa.table({
        "input_ids": column(0),
        "labels": column(1),
        "length": pa.array(lengths.astype(np.int32), type=pa.int32()),
        "conversation_id": pa.array([cid for cid, _ in rows], type=pa.string()),
    })
    return Dataset(InMemoryTable(table), fingerprint=fingerprint)


def _split_stats(ds: Dataset, conv_indices: list[int], source_tokens: np.ndarray, data: DataConfig,
                 context: int) -> dict[str, Any]:
    from vicuna_exp.data.batching import epoch_rows, example_lengths

    lengths = example_lengths(ds) if len(ds) else np.zeros(0, np.int64)
    labels = ds.data.column("labels").combine_chunks() if len(ds) else None
    supervised = int(np.count_nonzero(np.asarray(labels.values) != -100)) if labels is not None else 0
    rows = epoch_rows(ds, epoch=0, seed=0, context_length=context, packing=data.packing) if len(ds) else []
    total = int(lengths.sum())
    source = int(source_tokens[conv_indices].sum()) if conv_indices else 0
    return {
        "kept_records": len(conv_indices),
        "kept_examples": len(ds),
        "source_assistant_tokens": source,
        "supervised_tokens": supervised,
        "total_tokens": total,
        "rows": len(rows),
        "token_slots": len(rows) * context,
        "packing_efficiency": total / (len(rows) * context) if rows else 0.0,
        "retention": supervised / source if source else 0.0,
    }


# ------------------------------------------------------------------------------------------ task


def main(cfg: DictConfig) -> int:
    """`vicuna-exp prepare`: prepare (or find in the cache) the dataset; the last stdout line is its directory."""
    from vicuna_exp.data.tokenizer import load_tokenizer

    if not logging.getLogger().handlers and not log.handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    if cfg.model.get("tokenizer"):
        tok_path, key = cfg.model.tokenizer, "model.tokenizer"
    elif cfg.model.get("path"):
        tok_path, key = cfg.model.path, "model.path"
    else:
        tok_path, key = None, "model.tokenizer"
    tokenizer = load_tokenizer(tok_path, key=key)
    prepared = prepare(cfg.data, cfg.template, int(cfg.context.length), tokenizer, tok_path)
    s = prepared.stats
    dropped = {k: v for k, v in s["dropped"].items() if v}
    print(f"{'cached' if prepared.from_cache else 'prepared'}: {s['input_records']} records -> "
          f"{s['kept_records']} kept ({dropped or 'none dropped'}), {s['kept_examples']} examples "
          f"(train {len(prepared.train)}, eval {len(prepared.eval)}) at context {s['context_length']}")
    print(f"tokens {s['total_tokens']}, supervised {s['supervised_tokens']}, retention {s['retention']:.4f}, "
          f"packing efficiency {s['packing_efficiency']:.4f} (packing={s['packing']})")
    if s["source"]["truncated"]:
        print(f"note: {s['source']['notes'][0]}")
    print(prepared.path)
    return 0
