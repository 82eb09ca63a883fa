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
