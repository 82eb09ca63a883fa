"""Preparation end to end on the packaged sample: stats, splits, cache hit/miss/invalidation, concurrency."""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from dataclasses import replace

import pytest
from omegaconf import OmegaConf

from vicuna_exp.config import load_option
from vicuna_exp.data.make_sample import SAMPLE_PATH
from vicuna_exp.data.prepare import main, prepare
from vicuna_exp.data.tokenizer import load_tokenizer
from vicuna_exp.errors import UsageError

SAMPLE = load_option("data", "sample")  # the packaged sample, as conf/data/sample.yaml sets it
VICUNA = load_option("template", "vicuna_v1.1")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def sample(tok, cache):
    return prepare(replace(SAMPLE, cache_dir=cache), VICUNA, 512, tok, None)


def test_sample_preparation_stats(sample):
    s = sample.stats
    assert s["input_records"] == 410 == s["kept_records"] + sum(s["dropped"].values())
    assert s["dropped"]["malformed"] == 1 and s["dropped"]["duplicate"] >= 1
    assert s["cleaning"]["html_converted_messages"] == 1 and s["cleaning"]["turns_merged"] == 1
    assert s["retention"] == 1.0 and s["supervised_tokens"] == s["source_assistant_tokens"]
    assert s["packing_efficiency"] > 0.9
    counted = sum(sum(y != -100 for y in ex) for split in (sample.train, sample.eval) for ex in split["labels"])
    assert counted == s["supervised_tokens"]
    assert s["splits"]["train"]["kept_examples"] == len(sample.train) and len(sample.eval) > 0
    assert s["kept_examples"] == len(sample.train) + len(sample.eval)
    assert set(sample.train["conversation_id"]).isdisjoint(sample.eval["conversation_id"])
    assert sample.train.column_names == ["input_ids", "labels", "length", "conversation_id"]
    assert all(len(x) == n for x, n in zip(sample.train["input_ids"], sample.train["length"], strict=True))
    from datasets import load_from_disk

    dd = load_from_disk(str(sample.path))
    assert set(dd) == {"train", "eval"} and len(dd["train"]) == len(sample.train)


def test_cache_hit_and_eval_split_shared_across_contexts(sample, tok, cache):
    t = time.perf_counter()
    again = prepare(replace(SAMPLE, cache_dir=cache, num_proc=1, group_by_length=True), VICUNA, 512, tok, None)
    assert time.perf_counter() - t < 1.0
    assert again.from_cache and again.path == sample.path and again.data_hash == sample.data_hash
    short = prepare(replace(SAMPLE, cache_dir=cache), VICUNA, 32, tok, None)
    assert short.path != sample.path and not short.from_cache
    assert set(short.eval["conversation_id"]) == set(sample.eval["conversation_id"])
    assert short.stats["retention"] == 1.0 and max(short.train["length"]) <= 32
    assert short.stats["overflow"]["split_conversations"] > 0


@pytest.mark.parametrize("change", ["context", "system", "packing", "overflow", "eval_fraction", "data"])
def test_cache_invalidation(sample, tok, cache, tmp_path, change):
    data, template, context = replace(SAMPLE, cache_dir=cache), VICUNA, 512
    if change == "context":
        context = 256
    elif change == "system":
        template = replace(VICUNA, system="Be brief.")
    elif change == "packing":
        data = replace(data, packing=False)
    elif change == "overflow":
        data = replace(data, overflow="truncate")
    elif change == "eval_fraction":
        data = replace(data, eval_fraction=0.1)
    else:
        records = json.loads(SAMPLE_PATH.read_text())
        records[0]["conversations"][1]["value"] = "a different answer"
        path = tmp_path / "edited.json"
        path.write_text(json.dumps(records))
        data = replace(data, path=str(path))
    other = prepare(data, template, context, tok, None)
    assert other.path != sample.path and other.data_hash != sample.data_hash and not other.from_cache


def test_incomplete_entry_is_rebuilt(tok, tmp_path):
    cfg = replace(SAMPLE, cache_dir=str(tmp_path), max_records=50)
    first = prepare(cfg, VICUNA, 128, tok, None)
    (first.path / "stats.json").unlink()  # as if someone else's copy was cut short
    again = prepare(cfg, VICUNA, 128, tok, None)
    assert again.path == first.path and not again.from_cache and (again.path / "stats.json").is_file()
    assert not list((tmp_path / "prepared").glob(".tmp-*"))


def _prepare_in_child(cache_dir: str, barrier) -> tuple[str, bool, int]:
    import os

    os.environ["OMP_NUM_THREADS"] = "1"
    from vicuna_exp.data.prepare import prepare
    from vicuna_exp.data.tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    barrier.wait()
    p = prepare(replace(SAMPLE, cache_dir=cache_dir), VICUNA, 384, tok, None)
    return str(p.path), p.from_cache, p.stats["created_by"]["pid"]


def test_two_concurrent_preparations_share_one_build(tmp_path):
    ctx = mp.get_context("spawn")
    barrier = ctx.Manager().Barrier(2)
    with ctx.Pool(2) as pool:
        results = pool.starmap(_prepare_in_child, [(str(tmp_path), barrier)] * 2)
    paths = {r[0] for r in results}
    assert len(paths) == 1
    assert sorted(r[1] for r in results) == [False, True]  # one built it, the other reused it
    assert len({r[2] for r in results}) == 1  # both see the same builder
    assert len(list((tmp_path / "prepared").iterdir())) == 1


def test_truncated_file_is_reported(tok, tmp_path):
    text = SAMPLE_PATH.read_text()
    path = tmp_path / "cut.json"
    path.write_text(text[: len(text) // 2])
    p = prepare(replace(SAMPLE, path=str(path), cache_dir=str(tmp_path)), VICUNA, 256, tok, None)
    cut = p.stats["source"]["truncated"]
    assert cut is not None and cut["whole_records"] == p.stats["input_records"] > 100
    assert "ends in the middle of record" in p.stats["source"]["notes"][0]


def test_corrupt_record_mid_file_is_a_usage_error(tok, tmp_path):
    records = json.loads(SAMPLE_PATH.read_text())
    text = json.dumps(records[:300], indent=1)
    broken = text.replace('"sample_0200"', '"sample_0200" "oops"', 1)  # invalid JSON deep in the file
    path = tmp_path / "broken.json"
    path.write_text(broken)
    with pytest.raises(UsageError, match=r"broken\.json:\d+:\d+: record 200 is not valid JSON"):
        prepare(replace(SAMPLE, path=str(path), cache_dir=str(tmp_path)), VICUNA, 256, tok, None)
    assert not (tmp_path / "prepared").exists() or not any((tmp_path / "prepared").iterdir())


def test_nothing_left_is_a_usage_error(tok, tmp_path):
    path = tmp_path / "strings.json"
    path.write_text(json.dumps(["not", "sharegpt"]))
    with pytest.raises(UsageError, match=r"strings\.json: nothing left after cleaning: 2 records read.*malformed"):
        prepare(replace(SAMPLE, path=str(path), cache_dir=str(tmp_path)), VICUNA, 256, tok, None)
    with pytest.raises(UsageError, match="data.overflow"):
        prepare(replace(SAMPLE, overflow="wrap", cache_dir=str(tmp_path)), VICUNA, 256, tok, None)


def test_prepare_task_prints_the_directory_last(tmp_path, capsys, sample):
    cfg = OmegaConf.create({
        "model": {"tokenizer": None, "path": None},
        "context": {"length": 512},
        "data": OmegaConf.structured(replace(SAMPLE, cache_dir=str(sample.path.parent.parent))),
        "template": OmegaConf.structured(VICUNA),
    })
    assert main(cfg) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == str(sample.path) and out[0].startswith("cached: 410 records")
    cfg.model.tokenizer = str(tmp_path / "missing")
    with pytest.raises(UsageError, match="model.tokenizer: tokenizer directory not found"):
        main(cfg)
