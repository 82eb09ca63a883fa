"""A corrupt prepared cache is found when opened and rebuilt: an Arrow IPC stream cut short still
reads, silently, up to its last complete record batch, so the sizes and row counts recorded at
write time are checked at open, and a mismatch is a warning naming the file."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pytest

from vicuna_exp.config import load_option
from vicuna_exp.data.cache import MANIFEST
from vicuna_exp.data.prepare import prepare
from vicuna_exp.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def _prepare(tok, cache: Path):
    return prepare(replace(load_option("data", "sample"), cache_dir=str(cache)), load_option("template", "vicuna_v1.1"),
                   512, tok, None)


def _train_file(entry: Path) -> Path:
    (arrow,) = (entry / "train").glob("*.arrow")
    return arrow


def test_a_truncated_file_is_rebuilt(tok, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = _prepare(tok, tmp_path)
    rows, arrow = len(good.train), _train_file(good.path)
    with arrow.open("r+b") as f:
        f.truncate(arrow.stat().st_size // 2)
    with caplog.at_level(logging.WARNING):
        again = _prepare(tok, tmp_path)
    assert any(str(arrow) in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)
    assert not again.from_cache and again.path == good.path and len(again.train) == rows
    caplog.clear()
    assert _prepare(tok, tmp_path).from_cache and not caplog.records  # the rebuilt entry is sound


def test_a_record_batch_cut_is_rebuilt(tok, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from datasets import load_from_disk

    good = _prepare(tok, tmp_path)
    rows, arrow = len(good.train), _train_file(good.path)
    table = pa.ipc.open_stream(arrow.read_bytes()).read_all()  # a copy: the file is rewritten below
    cut = table.slice(0, rows // 2)  # a whole, valid stream that ends a record batch early
    with pa.OSFile(str(arrow), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(cut)
    (good.path / MANIFEST).unlink()  # as an entry from before sizes were recorded: only rows can tell
    assert len(load_from_disk(str(good.path))["train"]) == rows // 2  # datasets reads it without a word
    with caplog.at_level(logging.WARNING):
        again = _prepare(tok, tmp_path)
    assert any(str(arrow) in r.getMessage() and f"{rows // 2} rows, but {rows}" in r.getMessage()
               for r in caplog.records)
    assert not again.from_cache and len(again.train) == rows
    assert (again.path / MANIFEST).is_file()
