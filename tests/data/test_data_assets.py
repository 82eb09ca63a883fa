"""The packaged sample and tiny tokenizer: reproducible from the project's scripts, LLaMA conventions."""

from __future__ import annotations

import json

import pytest

from vicuna_exp.data import build_tokenizer, make_sample
from vicuna_exp.data.tokenizer import PACKAGED_TOKENIZER_DIR, load_tokenizer
from vicuna_exp.errors import UsageError


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def test_sample_is_reproducible_and_sharegpt_shaped():
    packaged = json.loads(make_sample.SAMPLE_PATH.read_text(encoding="utf-8"))
    assert packaged == make_sample.build()
    assert 300 <= len(packaged) <= 600
    good = [r for r in packaged if r["id"].startswith("sample_")]
    assert all(isinstance(t["value"], str) and t["from"] in ("human", "gpt", "user", "assistant")
               for r in good for t in r["conversations"])
    assert any(len(r["conversations"]) >= 4 for r in good)  # multi-turn
    assert sum(1 for r in packaged if r["id"].startswith("messy_")) >= 5


def test_tokenizer_is_reproducible(tmp_path):
    text = build_tokenizer.build(make_sample.SAMPLE_PATH)
    packaged = json.loads((PACKAGED_TOKENIZER_DIR / "tokenizer.json").read_text(encoding="utf-8"))
    assert json.loads(text) == packaged


def test_tokenizer_llama_conventions(tok):
    assert tok.is_fast
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert 1000 <= len(tok) <= 4096
    ids = tok("Hello world").input_ids
    assert ids[0] == 1 and ids[-1] != 2  # adds <s>, not </s>
    pieces = tok.convert_ids_to_tokens(tok("What is the capital of Peru?").input_ids)
    assert pieces[1].startswith("▁") and all("▁" not in p[1:] for p in pieces[1:])
    for text in ("€ 😀 zebra", "naïve café", "你好"):  # byte fallback: nothing is unknown
        enc = tok(text).input_ids
        assert tok.unk_token_id not in enc
        assert tok.decode(enc, skip_special_tokens=True) == text


def test_load_tokenizer_errors_name_key_and_path(tmp_path):
    with pytest.raises(UsageError, match=r"model\.path: tokenizer directory not found: .*nope"):
        load_tokenizer(str(tmp_path / "nope"), key="model.path")
    (tmp_path / "config.json").write_text("{}")  # a model's directory without its tokenizer files
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
    with pytest.raises(UsageError, match=rf"model\.tokenizer: {tmp_path} holds no vocabulary: it needs "
                                         r"tokenizer\.json .* it holds config\.json, tokenizer_config\.json"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UsageError, match=rf"model\.tokenizer: cannot load a tokenizer from {tmp_path} offline"):
        load_tokenizer(str(tmp_path))


def test_a_tokenizer_that_cannot_be_loaded_exits_2(tmp_path, capsys):
    from vicuna_exp.cli import main

    (tmp_path / "config.json").write_text("{}")
    assert main(["prepare", f"model.tokenizer={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} holds no vocabulary" in err and "tokenizer.json" in err and "Traceback" not in err
