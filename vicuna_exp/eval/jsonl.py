"""JSONL reading and writing shared by the eval steps.

Readers report the file and line of a bad record (a UsageError, since it is bad input);
writers replace files atomically so an interrupted step never leaves half a file.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from vicuna_exp.errors import UsageError

log = logging.getLogger(__name__)


def read_jsonl(path: Path, *, lenient: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for every non-blank line.

    `lenient` skips lines that are not JSON objects instead of failing: for files this project
    appends to itself (caches, answers being generated), where a killed writer leaves a torn line.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text ({e.reason})") from None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if lenient:
                log.warning("%s:%d: skipped a line that is not valid JSON (a torn write?)", path, i + 1)
                continue
            raise UsageError(f"{path}:{i + 1}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            if lenient:
                continue
            raise UsageError(f"{path}:{i + 1}: expected a JSON object, got {type(obj).__name__}")
        yield i + 1, obj


def write_jsonl_atomic(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write all rows to a temp file beside `path`, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Append rows and flush, so finished work survives a crash of what follows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # a torn last line: keep it on its own line
                f.write(b"\n")
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path: Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
