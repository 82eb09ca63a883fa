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

from vicuna_exp.data import cache
from vicuna_exp.data.config import CACHE_IRRELEVANT, DataConfig, TemplateConfig
from vicuna_exp.data.encode import IGNORE, check_special_tokens
from vicuna_exp.errors import UsageError

if TYPE_CHECKING:
    from datasets import Dataset
    from omegaconf import DictConfig
    from transformers import PreTrainedTokenizerFast

    from vicuna_exp.data.clean import Conversation

log = logging.getLogger("vicuna_exp.data")

PIPELINE_VERSION = 1  # bump when the code changes what a preparation contains
TEXT_BYTES = "text_bytes"  # per split in stats.json: the UTF-8 bytes of its conversations


@dataclass
class PreparedData:
    path: Path  # the prepared directory (DatasetDict + stats.json)
    train: Dataset
    eval: Dataset
    stats: dict[str, Any]
    data_hash: str  # the cache key: raw data, settings, template, tokenizer, context
    from_cache: bool = False


def _key_parts(data: DataConfig, template: TemplateConfig, context: int, raw_hash: str, tok_hash: str) -> dict:
    settings = {k: v for k, v in dataclasses.asdict(data).items() if k not in CACHE_IRRELEVANT}
    template_key = dataclasses.asdict(template)
    if not template_key["special_tokens"]:  # a key added later: at [] the caches keep their keys
        del template_key["special_tokens"]
    return {"pipeline": PIPELINE_VERSION, "raw_data": raw_hash, "data": settings,
            "template": template_key, "tokenizer": tok_hash, "context": int(context)}


def prepare(
    data_cfg: DataConfig | DictConfig,
    template_cfg: TemplateConfig | DictConfig,
    context_length: int,
    tokenizer: PreTrainedTokenizerFast,
    tokenizer_dir: str | None,
    *,
    count_text: bool = False,
) -> PreparedData:
    """The prepared dataset for these settings: from the cache, or built (once, under a lock) and cached.

    The sections are the schema's objects, or the composed config's nodes of those schemas
    (`cfg.data`); either is checked against the schema again, so no key is lost on the way.
    `count_text`: the caller needs each split's text bytes, so a cached entry prepared before they
    were counted is prepared again (same key, same rows; its stats gain the count).
    """
    from vicuna_exp.config import as_schema
    from vicuna_exp.data.clean import check_config
    from vicuna_exp.data.load import resolve_path
    from vicuna_exp.data.template import check_template, with_special_tokens

    data = as_schema(data_cfg, DataConfig, "data")
    # The tokens as the tokenizer names them, before the cache key: a template whose tokens come
    # from the tokenizer keys the same preparation as one that spells out the same tokens.
    template = with_special_tokens(as_schema(template_cfg, TemplateConfig, "template"), tokenizer)
    check_config(data)
    check_template(template)
    check_special_tokens(template, tokenizer)  # before reading any data
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

    opener = _open_with_text_bytes if count_text else open_prepared
    prepared, built = cache.get_or_build(root, name, key, build, on_wait=waiting, open_entry=opener)
    prepared.from_cache = not built
    return prepared


def open_prepared(path: str | Path) -> PreparedData:
    """Open a prepared directory (memory-mapped: fast, whatever its size), checked against what was
    written: file sizes, then each split's rows (raises cache.CorruptEntry naming the file)."""
    from datasets import load_from_disk

    path = Path(path)
    cache.check_manifest(path)
    stats = json.loads((path / "stats.json").read_text())
    try:
        dd = load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - a file datasets cannot read at all
        raise cache.CorruptEntry(f"{path}: cannot be opened ({type(e).__name__}: {e})") from None
    for split, written in stats.get("splits", {}).items():
        if split in dd and len(dd[split]) != written["kept_examples"]:
            files = ", ".join(f["filename"] for f in dd[split].cache_files) or str(path / split)
            raise cache.CorruptEntry(f"{files}: {len(dd[split])} rows, but {written['kept_examples']} when written")
    return PreparedData(path, dd["train"], dd["eval"], stats, stats["data_hash"])


def _open_with_text_bytes(path: str | Path) -> PreparedData:
    prepared = open_prepared(path)
    if not has_text_bytes(prepared.stats):
        raise cache.StaleEntry(f"{Path(path) / 'stats.json'}: no {TEXT_BYTES} (prepared before text was counted; "
                                 "trainer.bytes_per_step needs it)")
    return prepared


# ----------------------------------------------------------------------------------------- build


def _build(tmp: Path, raw_path: Path, data: DataConfig, template: TemplateConfig, context: int,
           tokenizer: PreTrainedTokenizerFast, key: str, parts: dict) -> None:
    from vicuna_exp.data.clean import DROP_REASONS, CleanResult, clean_stream, in_eval_split
    from vicuna_exp.data.encode import ConversationEncoder
    from vicuna_exp.data.load import iter_records
    from vicuna_exp.data.split import SplitResult, encode_and_split

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    # One pipelined pass: records are read and cleaned as the tokenizer's threads need them, and
    # each chunk's examples go into their split's columns while the next chunks are tokenized.
    raw, records = iter_records(raw_path, data.format, data.max_records)
    cleaned = CleanResult([], 0)
    encoder = ConversationEncoder(tokenizer, template)
    columns = {"train": _Columns(), "eval": _Columns()}
    conv_splits: dict[str, list[int]] = {"train": [], "eval": []}

    def collect(res: SplitResult, start: int, stop: int) -> None:
        for ci in range(start, stop):
            examples = res.examples.pop(ci, None)
            if examples:
                name = "eval" if in_eval_split(res.convs[ci].id, data.seed, data.eval_fraction) else "train"
                columns[name].add(res.convs[ci].id, examples)
                columns[name].text_bytes += conversation_bytes(res.convs[ci])
                conv_splits[name].append(ci)
        for c in columns.values():
            c.close_chunk()

    split = encode_and_split(clean_stream(records, data, cleaned, num_proc=data.num_proc or 1),
                             encoder, context, data.overflow, on_chunk=collect)
    for note in raw.notes:
        log.warning("%s", note)
    dropped: Counter = Counter({r: 0 for r in DROP_REASONS})
    dropped.update(cleaned.dropped)
    if not split.convs:
        raise UsageError(f"{raw_path}: nothing left after cleaning: {raw.count} records read, "
                         f"dropped {dict((k, v) for k, v in dropped.items() if v)}")
    dropped.update(split.dropped)
    source_tokens, alive = split.source_tokens, split.alive
    overflow, dropped_examples = split.overflow, split.dropped_examples
    timings["read_clean_encode_split_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    from concurrent.futures import ThreadPoolExecutor

    from datasets import DatasetDict
    from datasets.utils import logging as ds_logging

    dd = DatasetDict({name: c.dataset(_fingerprint(key, name)) for name, c in columns.items()})
    bars = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        # Arrow writes without the GIL: the statistics (a packing plan in Python) are computed meanwhile.
        with ThreadPoolExecutor(max_workers=1) as writer:
            # one shard per split: datasets writes an empty split with zero shards and cannot reopen it
            saved = writer.submit(dd.save_to_disk, str(tmp), num_shards={name: 1 for name in dd})
            split_stats = {name: _split_stats(np.asarray(columns[name].lengths, dtype=np.int64),
                                              columns[name].supervised, idx, source_tokens, data, context,
                                              columns[name].text_bytes)
                           for name, idx in conv_splits.items()}
            saved.result()
    finally:
        if bars:
            ds_logging.enable_progress_bar()
    timings["write_s"] = time.perf_counter() - t

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


class _Columns:
    """One split's rows, gathered chunk by chunk: each chunk's examples become Arrow arrays at once
    (while the tokenizer works on later chunks); the table's columns are these chunks, not copied
    into one array at the end."""

    def __init__(self) -> None:
        self._ids: list[np.ndarray] = []  # the open chunk's examples
        self._labels: list[np.ndarray] = []
        self._lengths: list[int] = []
        self.ids: list[Any] = []  # closed chunks, each a pyarrow ListArray
        self.labels: list[Any] = []
        self.lengths: list[int] = []
        self.conversation_ids: list[str] = []
        self.supervised = 0  # labels that are not IGNORE
        self.tokens = 0
        self.text_bytes = 0  # UTF-8 bytes of the split's conversations (`conversation_bytes`)

    def add(self, conversation_id: str, examples: list[tuple[np.ndarray, np.ndarray]]) -> None:
        for ids, labels in examples:
            self._ids.append(ids)
            self._labels.append(labels)
            self._lengths.append(len(ids))
            self.conversation_ids.append(conversation_id)

    def close_chunk(self) -> None:
        import pyarrow as pa

        if not self._ids:
            return
        offsets = np.zeros(len(self._lengths) + 1, dtype=np.int64)
        np.cumsum(self._lengths, out=offsets[1:])
        self.tokens += int(offsets[-1])
        if self.tokens >= 2**31:
            raise UsageError("data: more than 2^31 tokens in one split; use data.max_records to prepare less")
        off = pa.array(offsets.astype(np.int32), type=pa.int32())
        labels = np.concatenate(self._labels, dtype=np.int32)
        self.supervised += int(np.count_nonzero(labels != IGNORE))
        self.ids.append(pa.ListArray.from_arrays(off, pa.array(np.concatenate(self._ids, dtype=np.int32))))
        self.labels.append(pa.ListArray.from_arrays(off, pa.array(labels)))
        self.lengths += self._lengths
        self._ids, self._labels, self._lengths = [], [], []

    def dataset(self, fingerprint: str | None = None) -> Dataset:
        """The rows as a Dataset, built from the arrays directly (no per-token Python objects)."""
        import pyarrow as pa
        from datasets import Dataset
        from datasets.table import InMemoryTable

        self.close_chunk()
        token_lists = pa.list_(pa.int32())
        table = pa.table({
            "input_ids": pa.chunked_array(self.ids, type=token_lists),
            "labels": pa.chunked_array(self.labels, type=token_lists),
            "length": pa.array(np.asarray(self.lengths, dtype=np.int32), type=pa.int32()),
            "conversation_id": pa.array(self.conversation_ids, type=pa.string()),
        })
        return Dataset(InMemoryTable(table), fingerprint=fingerprint)


def _split_stats(lengths: np.ndarray, supervised: int, conv_indices: list[int], source_tokens: np.ndarray,
                 data: DataConfig, context: int, text_bytes: int) -> dict[str, Any]:
    """One split's figures, from its examples' lengths (the packing plan is the first epoch's)."""
    from vicuna_exp.data.batching import epoch_rows

    rows = epoch_rows(lengths, epoch=0, seed=0, context_length=context, packing=data.packing) if len(lengths) else []
    total = int(lengths.sum())
    source = int(source_tokens[conv_indices].sum()) if conv_indices else 0
    return {
        "kept_records": len(conv_indices),
        "kept_examples": len(lengths),
        "source_assistant_tokens": source,
        "supervised_tokens": supervised,
        "total_tokens": total,
        "rows": len(rows),
        "token_slots": len(rows) * context,
        "packing_efficiency": total / (len(rows) * context) if rows else 0.0,
        "retention": supervised / source if source else 0.0,
        # The text the examples were cut from, whatever the tokenizer: `trainer.bytes_per_step` divides it
        # by total_tokens to hold text per step equal across vocabularies.
        TEXT_BYTES: text_bytes,
    }


def conversation_bytes(conv: Conversation) -> int:
    """UTF-8 bytes of a cleaned conversation's messages (system prompt included, template left out):
    the same for every tokenizer, so it measures how much text a token carries."""
    text = sum(len(u.encode()) + len(a.encode()) for u, a in conv.turns)
    return text + (len(conv.system.encode()) if conv.system else 0)


def has_text_bytes(stats: dict[str, Any]) -> bool:
    """Whether a preparation counted its text (one written before `TEXT_BYTES` existed did not)."""
    return all(TEXT_BYTES in s for s in stats.get("splits", {}).values())


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
