"""Base families beyond LLaMA through the one path: options, architecture, special tokens, bad input.

The training runs themselves (single, FSDP2, ZeRO-3, resume, export) are in
tests/backends/test_families_multiprocess.py; this module stays in-process and fast.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from vicuna_exp.cli import main
from vicuna_exp.config import config_hash, load_option, typed_config
from vicuna_exp.data.template import with_special_tokens
from vicuna_exp.data.tokenizer import PACKAGED_TOKENIZER_DIR, load_tokenizer, token_ids
from vicuna_exp.errors import UsageError
from vicuna_exp.hydra_app import compose
from vicuna_exp.model import decoder_layers, make_model_spec

TINY = ["logger=none", "trainer.max_steps=1", "trainer.eval_every_steps=null", "trainer.eval_max_rows=2",
        "trainer.micro_batch_size=1", "trainer.global_batch_size=1", "context.length=128"]
BASES = {"llama3-8b": ("LlamaConfig", 8, 128256), "llama3.1-8b": ("LlamaConfig", 8, 128256),
         "mistral-7b": ("MistralConfig", 8, 32000), "qwen2.5-7b": ("Qwen2Config", 4, 152064)}


def _spec(option: str, **overrides: object):
    cfg = compose([f"model={option}", *(f"model.{k}={v}" for k, v in overrides.items())])
    return make_model_spec(cfg.model, vocab_size=cfg.model.vocab_size or 512, device=torch.device("cpu"),
                           precision="fp32")


@pytest.mark.parametrize("option", BASES)
def test_each_base_option_states_its_family(option: str) -> None:
    m = load_option("model", option)
    architecture, kv_heads, vocab = BASES[option]
    assert (m.architecture, m.num_key_value_heads, m.vocab_size, m.init) == (architecture, kv_heads, vocab,
                                                                              "pretrained")
    assert (m.rope_scaling is not None) == (option == "llama3.1-8b")
    assert (m.sliding_window is not None) == (option == "mistral-7b")


@pytest.mark.parametrize("option,cls,layer", [("tiny-llama3", "LlamaForCausalLM", "LlamaDecoderLayer"),
                                              ("tiny-mistral", "MistralForCausalLM", "MistralDecoderLayer"),
                                              ("tiny-qwen2", "Qwen2ForCausalLM", "Qwen2DecoderLayer")])
def test_tiny_families_keep_their_distinguishing_features(option: str, cls: str, layer: str) -> None:
    model = _spec(option, vocab_size=512).build_meta()
    assert type(model).__name__ == cls
    assert {type(m).__name__ for m in decoder_layers(model, "test")} == {layer}
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.out_features < attn.q_proj.out_features  # GQA
    assert (attn.q_proj.bias is not None) == (option == "tiny-qwen2")
    assert (getattr(model.config, "sliding_window", None) is not None) == (option == "tiny-mistral")
    assert model.config.tie_word_embeddings == (option == "tiny-qwen2")
    if option == "tiny-llama3":
        assert model.config.rope_parameters["rope_type"] == "llama3"


def test_new_keys_at_their_llama_values_leave_the_hash_and_a_run_dir_from_before_reads_them() -> None:
    cfg = compose([])
    before = config_hash(cfg)
    old = OmegaConf.to_container(cfg)
    for key in ("architecture", "rope_scaling", "sliding_window"):
        old["model"].pop(key)
    old["template"].update(bos_token="<s>", eos_token="</s>")  # how vicuna_v1.1 spelt them
    again = typed_config(old)
    assert again.model.architecture == "LlamaConfig" and config_hash(again) == before
    assert config_hash(compose(["model.architecture=MistralConfig"])) != before
    assert config_hash(compose(["template.eos_token='<|end_of_text|>'"])) != before


def test_vicuna_takes_bos_and_eos_from_the_tokenizer(real_vocabulary) -> None:
    template = load_option("template", "vicuna_v1.1")
    assert (template.bos_token, template.eos_token) == (None, None)
    packaged = with_special_tokens(template, load_tokenizer(None))
    assert (packaged.bos_token, packaged.eos_token) == ("<s>", "</s>")  # the published template
    llama3 = with_special_tokens(template, real_vocabulary("llama3"))
    assert (llama3.bos_token, llama3.eos_token) == ("<|begin_of_text|>", "<|eot_id|>")


def test_a_tokenizer_without_bos_leaves_it_out(real_vocabulary) -> None:
    """Qwen has no BOS: vicuna_v1.1 encodes without one; a template that writes {bos} is refused."""
    from vicuna_exp.data.encode import encode_conversation

    tok = real_vocabulary("llama3")
    template = load_option("template", "vicuna_v1.1")
    no_bos = type("NoBos", (), {"bos_token": None, "eos_token": tok.eos_token, "name_or_path": "qwen-like"})()
    resolved = with_special_tokens(template, no_bos)
    assert resolved.bos_token is None
    ids, labels = encode_conversation([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                      tok, resolved)
    assert ids[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id
    with pytest.raises(UsageError, match=r"template.bos_token: the template writes \{bos\}"):
        with_special_tokens(dataclasses.replace(load_option("template", "llama-2-chat"), bos_token=None), no_bos)


def test_random_init_records_the_tokenizers_special_ids(real_vocabulary) -> None:
    tok = real_vocabulary("llama3")
    cfg = compose(["model=tiny-qwen2"])
    spec = make_model_spec(cfg.model, vocab_size=len(tok), device=torch.device("cpu"), precision="fp32",
                           token_ids=token_ids(tok))
    c = spec.hf_config
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (128000, tok.eos_token_id, tok.pad_token_id)


def test_export_names_the_family_class_of_a_random_init_model(tmp_path: Path) -> None:
    from vicuna_exp.export import write_hf_config

    write_hf_config(_spec("tiny-mistral", vocab_size=512).hf_config, tmp_path, "fp32")
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["MistralForCausalLM"]


# ---- bad input: exit 2, naming what was looked for -----------------------------------------------
def test_no_split_modules_naming_no_class_of_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _spec("tiny-mistral", vocab_size=512).build_meta()
    monkeypatch.setattr(model, "_no_split_modules", {"MistralBlock"})  # gathered per instance by post_init
    with pytest.raises(UsageError, match="_no_split_modules names MistralBlock"):
        decoder_layers(model, "backend=fsdp")


@pytest.mark.parametrize("override,needle", [
    ("model.architecture=FalconMambaXConfig", "model.architecture=FalconMambaXConfig"),
    ("model.sliding_window=64", "model.sliding_window: LlamaConfig has no sliding_window"),
    ("model.vocab_size=100", "model.vocab_size: the tokenizer has"),
])
def test_bad_family_input_exits_2(override: str, needle: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", *TINY, override, f"hydra.run.dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_an_architecture_transformers_does_not_know(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "vicuna_exp_unknown_family"}))
    (model_dir / "model.safetensors").write_bytes(b"")
    code = main(["train", *TINY, "model=tiny-mistral", "model.init=pretrained", f"model.path={model_dir}",
                 f"model.tokenizer={PACKAGED_TOKENIZER_DIR}",
                 f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and "vicuna_exp_unknown_family" in err and "Traceback" not in err
