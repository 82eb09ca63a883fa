"""Reading raw files: the one-call parse of a whole JSON list, CRLF files, and the record-by-record fallback."""

from __future__ import annotations

import json
from pathlib import Path

from vicuna_exp.data.load import read_records

RECORDS = [{"id": f"c{i}", "conversations": [{"from": "human", "value": f"line one\nline two {i}"},
                                               {"from": "gpt", "value": "ok\r\nfine"}]} for i in range(5)]


def test_whole_list_and_crlf_give_the_same_records(tmp_path: Path) -> None:
    lf = tmp_path / "lf.json"
    lf.write_text(json.dumps(RECORDS, indent=1))
    crlf = tmp_path / "crlf.json"
    crlf.write_bytes(json.dumps(RECORDS, indent=1).replace("\n", "\r\n").encode())
    a, b = read_records(lf), read_records(crlf)
    assert a.records == b.records == RECORDS  # escaped newlines inside values are untouched
    assert a.truncated is None and b.truncated is None


def test_jsonl_with_crlf(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes("\r\n".join(json.dumps(r) for r in RECORDS).encode() + b"\r\n")
    assert read_records(path).records == RECORDS


def test_cut_file_falls_back_to_whole_records(tmp_path: Path) -> None:
    text = json.dumps(RECORDS, indent=1)
    path = tmp_path / "cut.json"
    path.write_text(text[: text.index('"c3"') + 10])  # cut inside record 3
    data = read_records(path)
    assert data.records == RECORDS[:3]
    assert data.truncated is not None


def _many(n: int) -> list[dict]:
    return [{"id": f"c{i}", "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "a"}]}
            for i in range(n)]


def test_values_the_fast_parser_refuses_take_the_stdlib_way(tmp_path: Path) -> None:
    """orjson parses a whole list; what it refuses (NaN, huge integers, lone surrogates) the stdlib
    reader still reads, with a BOM or without."""
    text = '[{"id": "a", "n": NaN, "big": 123456789012345678901234567890, "s": "\\ud800", "conversations": []}]'
    path = tmp_path / "odd.json"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert read_records(path).records == json.loads(text)
    path.write_text(json.dumps(_many(300)))
    assert read_records(path).records == _many(300)


def test_errors_deep_in_a_list_name_the_record_and_line(tmp_path: Path) -> None:
    """The one-call parse fails; the record-by-record reader names the record and its line."""
    import pytest

    from vicuna_exp.errors import UsageError

    bad = 205
    text = json.dumps(_many(300), indent=1)
    text = text.replace(f'"q{bad}"', f'"q{bad}" oops')
    path = tmp_path / "broken.json"
    path.write_text(text)
    line = text[:text.index("oops")].count("\n") + 1
    with pytest.raises(UsageError, match=rf"broken\.json:{line}:\d+: record {bad} is not valid JSON"):
        read_records(path)
    trailing = tmp_path / "trailing.json"
    trailing.write_text(json.dumps(_many(300)) + " []")
    with pytest.raises(UsageError, match="unexpected data after the end of the JSON list"):
        read_records(trailing)
    cut = tmp_path / "cut.json"
    whole = json.dumps(_many(300), indent=1)
    cut.write_text(whole[:whole.index(f'"c{bad}"') + 3])
    data = read_records(cut)
    assert data.records == _many(bad) and data.truncated["whole_records"] == bad
