"""The two named ablations run end to end on a CPU: `finetune_method` (arms) and `base_model` (text
per step), each once per module, then read back by the report. The cheapest arms, one or two steps."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vicuna_exp import sweep
from vicuna_exp.config import load_option
from vicuna_exp.data.prepare import prepare
from vicuna_exp.data.tokenizer import load_tokenizer, tokenizer_dir
from vicuna_exp.report import main as report_main
from vicuna_exp.report.collect import load_sweep
from vicuna_exp.report.compare import build_table
from vicuna_exp.text_budget import tokens_for_bytes

SMALL = ["trainer.micro_batch_size=4", "trainer.eval_max_rows=1", "trainer.save_final=false", "logger=none",
         "model.hidden_size=64", "model.intermediate_size=128", "model.num_hidden_layers=2"]

METHODS = ["trainer.max_steps=1", *SMALL]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Any:
    mp = pytest.MonkeyPatch()
    mp.setenv("OMP_NUM_THREADS", "1")
    mp.setenv("VICUNA_EXP_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    mp.setenv("WANDB_MODE", "disabled")
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def methods(env: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict, Path]:
    out = tmp_path_factory.mktemp("sweeps") / "finetune_method"
    code = sweep.main(["finetune_method", *METHODS, f"hydra.sweep.dir={out}"])
    return code, json.loads((out / "sweep.json").read_text()), out


@pytest.fixture(scope="module")
def bases(env: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict, Path]:
    """`tiny` finds its tokenizer under $BASE_MODELS; `tiny-mistral`'s directory is missing."""
    root = tmp_path_factory.mktemp("bases")
    shutil.copytree(tokenizer_dir(None), root / "tiny")
    env.setenv("BASE_MODELS", str(root))
    out = tmp_path_factory.mktemp("sweeps") / "base_model"
    code = sweep.main(["base_model", "model=tiny,tiny-mistral", "experiment=demo", "trainer.bytes_per_step=8192",
                       "trainer.max_steps=1", *SMALL, f"hydra.sweep.dir={out}"])
    return code, json.loads((out / "sweep.json").read_text()), out


def test_finetune_method_arms_complete_and_report_by_arm(methods: tuple[int, dict, Path]) -> None:
    code, result, out = methods
    assert code == 0
    assert [(j["name"], j["arm"], j["status"]) for j in result["jobs"]] == [
        ("arm=full", "full", "completed"), ("arm=lora_r8", "lora_r8", "completed"),
        ("arm=lora_r64", "lora_r64", "completed")]
    assert result["axes"] == {"arm": ["full", "lora_r8", "lora_r64"]}
    derived = {j["arm"]: json.loads((out / j["name"] / "summary.json").read_text())["derived"] for j in result["jobs"]}
    assert derived["full"]["trainable_params"] > derived["lora_r64"]["trainable_params"] > derived["lora_r8"]["trainable_params"]
    assert derived["lora_r8"]["lr_source"] == "optim.lr_by_method.lora"  # the method's rate, as `train` gives it
    assert len({d["tokens_per_step"] for d in derived.values()}) == 1  # equal tokens

    assert report_main([str(out)]) == 0
    rows = {r["job"]: r for r in build_table(load_sweep(out)).rows}
    assert sorted(rows) == ["arm=full", "arm=lora_r64", "arm=lora_r8"]
    for r in rows.values():
        assert r["final_eval_loss"] is not None and r["tokens_per_s"] and r["peak_mem_gb"] and r["trainable_params"]
    md = (out / "report.md").read_text()
    assert "| arm=lora_r8 | completed |" in md and "lora_r8 = finetune=lora finetune.r=8" in md
    assert "| trainable |" in md or "trainable |" in md
    held = md.split("## What was held constant", 1)[1].split("## Plots", 1)[0]
    assert "optim.lr = " not in held and "- optim.lr: " in held  # each arm's rate in force, not the preset's
    assert held.count("trainer.max_steps") == 1  # a shared override is listed once


def test_a_rerun_skips_every_completed_arm(methods: tuple[int, dict, Path]) -> None:
    _, first, out = methods
    assert sweep.main(["finetune_method", *METHODS, f"hydra.sweep.dir={out}"]) == 0
    again = json.loads((out / "sweep.json").read_text())
    assert [(j["arm"], j["status"]) for j in again["jobs"]] == [
        ("full", "skipped"), ("lora_r8", "skipped"), ("lora_r64", "skipped")]
    assert [j["config_hash"] for j in again["jobs"]] == [j["config_hash"] for j in first["jobs"]]


def test_base_model_holds_text_per_step_and_a_missing_tokenizer_fails_its_arm_alone(
        bases: tuple[int, dict, Path]) -> None:
    code, result, out = bases
    assert code == 1
    by_name = {j["name"]: j for j in result["jobs"]}
    assert by_name["model=tiny"]["status"] == "completed"
    failed = by_name["model=tiny-mistral"]
    assert failed["status"] == "failed" and failed["exit_code"] == 2
    assert "tokenizer directory not found" in failed["error"] and "tiny-mistral" in failed["error"]

    summary = json.loads((out / "model=tiny" / "summary.json").read_text())
    d, train = summary["derived"], summary["data_stats"]["splits"]["train"]
    assert d["bytes_per_step"] == 8192
    assert d["bytes_per_token"] == pytest.approx(train["text_bytes"] / train["total_tokens"], abs=1e-4)
    assert d["tokens_per_step"] == tokens_for_bytes(8192, train["text_bytes"] / train["total_tokens"], 512, 1)

    assert report_main([str(out)]) == 0
    rows = {r["name"]: r for r in build_table(load_sweep(out)).rows}
    assert rows["model=tiny-mistral"]["status"] == "failed"
    assert "tokenizer directory not found" in rows["model=tiny-mistral"]["note"]
    md = (out / "report.md").read_text()
    assert "text per optimizer step: trainer.bytes_per_step = 8,192 bytes" in md
    assert f"model=tiny: {d['bytes_per_token']:.3f} bytes/token" in md


def test_the_same_conversations_and_eval_split_under_every_vocabulary(env: pytest.MonkeyPatch,
                                                                      real_vocabulary: Callable[[str], Any]) -> None:
    """The eval split is a hash of the conversation id, and cleaning never sees the tokenizer: two
    vocabularies that cut the text very differently keep the same conversations in each split."""
    data, template = load_option("data", "sample"), load_option("template", "vicuna_v1.1")
    seen = []
    for tokenizer in (load_tokenizer(None), real_vocabulary("sentencepiece_32k")):
        p = prepare(data, template, 512, tokenizer, None, count_text=True)
        seen.append({split: (sorted(set(ds["conversation_id"])), p.stats["splits"][split]["text_bytes"],
                             p.stats["splits"][split]["total_tokens"]) for split, ds in (("train", p.train), ("eval", p.eval))})
    tiny, spm32k = seen
    for split in ("train", "eval"):
        assert tiny[split][:2] == spm32k[split][:2]  # the same conversation ids and the same text
        assert tiny[split][2] != spm32k[split][2]  # in different numbers of tokens
    assert tiny["eval"][0]
