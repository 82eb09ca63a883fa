"""Answer generation end to end with a tiny random-init LLaMA and the packaged tokenizer, and
parity between the prompts generation renders and the text training encodes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from vicuna_exp.config import load_option
from vicuna_exp.data.config import TemplateConfig
from vicuna_exp.data.encode import encode_conversation
from vicuna_exp.data.template import render_prompt, with_special_tokens
from vicuna_exp.data.tokenizer import load_tokenizer
from vicuna_exp.errors import UsageError
from vicuna_exp.eval import generate as gen_mod
from vicuna_exp.hydra_app import compose

QUESTIONS = [
    {"question_id": 11, "category": "writing", "turns": ["Write a line about the sea.", "Now about the sky."]},
    {"question_id": 12, "category": "math", "turns": ["What is 3 + 4?", "And times two?"], "reference": ["7", "14"]},
    {"question_id": 13, "category": "writing", "turns": ["Name a colour.", "Another one?"]},
    {"question_id": 14, "category": "generic", "text": "Say something kind."},
    {"question_id": 15, "category": "coding", "text": "Print hello in Python."},
]
RECORDED_SYSTEM = "You are the recorded system prompt of this run."


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run dir as training leaves it: final/ (model + tokenizer) and .hydra/config.yaml."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    run = tmp_path_factory.mktemp("runs") / "tiny-run"
    tok = load_tokenizer(None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, initializer_range=0.5,  # peaked logits: greedy is stable
    ))
    model.save_pretrained(run / "final")
    tok.save_pretrained(run / "final")
    recorded = OmegaConf.structured(load_option("template", "vicuna_v1.1"))
    recorded.system = RECORDED_SYSTEM
    (run / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create({"template": recorded}), run / ".hydra" / "config.yaml")
    return run


def _questions(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(run: Path, questions: Path, *extra: str):
    return compose([f"eval.run_dir={run}", f"eval.questions={questions}", "eval.max_new_tokens=6",
                    "eval.batch_size=2", "eval.require_judge=false", *extra])


class Spy:
    """Records every batch generate_batch is asked for, then runs the real thing."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[float, list[str]]] = []
        real = gen_mod.generate_batch

        def spy(model, tokenizer, device, prompts, temperature, max_new_tokens):
            self.calls.append((temperature, list(prompts)))
            return real(model, tokenizer, device, prompts, temperature, max_new_tokens)

        monkeypatch.setattr(gen_mod, "generate_batch", spy)


def _answers(run: Path, bench: str) -> list[dict]:
    path = run / "eval" / bench / "model_answer" / f"{run.name}.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_generate_writes_fastchat_answers(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    qs = _questions(tmp_path / "mini.jsonl", QUESTIONS)
    spy = Spy(monkeypatch)
    assert gen_mod.main(_cfg(tiny_run, qs, "eval.temperature.writing=0.7")) == 0

    answers = _answers(tiny_run, "mini")
    assert [a["question_id"] for a in answers] == [11, 12, 13, 14, 15]
    for a, q in zip(answers, QUESTIONS, strict=True):
        assert set(a) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert a["model_id"] == "tiny-run" and a["choices"][0]["index"] == 0
        assert len(a["choices"][0]["turns"]) == len(q.get("turns", [q.get("text")]))
        assert all(isinstance(t, str) for t in a["choices"][0]["turns"])

    # per-category temperature: writing sampled at 0.7, math and coding greedy, generic at the default
    temps = {}
    for t, prompts in spy.calls:
        for p in prompts:
            temps[p.split("USER: ", 1)[1].split(" ASSISTANT:")[0]] = t
    assert temps["Write a line about the sea."] == 0.7 and temps["What is 3 + 4?"] == 0.0
    assert temps["Print hello in Python."] == 0.0 and temps["Say something kind."] == 0.7

    # the second turn sees the model's own first answer, rendered with the training template
    by_id = {a["question_id"]: a["choices"][0]["turns"] for a in answers}
    want = render_prompt([
        {"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": by_id[12][0]},
        {"role": "user", "content": "And times two?"}], with_special_tokens(_recorded_template(tiny_run),
                                                            load_tokenizer(None)))
    assert any(want in prompts for _, prompts in spy.calls)
    # ... and the run's recorded template wins over the config's
    assert all(p.startswith(RECORDED_SYSTEM) for _, prompts in spy.calls for p in prompts)

    record = json.loads((tiny_run / "eval" / "mini" / "generation.json").read_text())
    assert record["model_id"] == "tiny-run" and record["template"]["system"] == RECORDED_SYSTEM

    # a rerun has nothing left to answer and does not even load the model
    def no_load(*a, **k):
        raise AssertionError("model loaded although every question is answered")

    monkeypatch.setattr(gen_mod, "load_model", no_load)
    assert gen_mod.main(_cfg(tiny_run, qs)) == 0
    assert _answers(tiny_run, "mini") == answers


def _recorded_template(run: Path):
    return OmegaConf.merge(OmegaConf.structured(TemplateConfig),
                           OmegaConf.load(run / ".hydra" / "config.yaml").template)


def test_resume_answers_only_what_is_missing(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    qs = _questions(tmp_path / "resume.jsonl", QUESTIONS[:3])
    greedy = ["eval.default_temperature=0", "eval.temperature.writing=0"]
    assert gen_mod.main(_cfg(tiny_run, qs, *greedy)) == 0
    path = tiny_run / "eval" / "resume" / "model_answer" / "tiny-run.jsonl"
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[2] + "\n" + '{"question_id": 12, "answ')  # as if killed mid-write
    spy = Spy(monkeypatch)
    assert gen_mod.main(_cfg(tiny_run, qs, *greedy)) == 0
    assert sum(len(p) for _, p in spy.calls) == 2  # question 12's two turns, nothing else
    assert path.read_text().splitlines()[1].startswith('{"question_id": 12')
    assert [a["question_id"] for a in _answers(tiny_run, "resume")] == [11, 12, 13]


def test_batched_greedy_equals_one_at_a_time(tiny_run: Path, tmp_path: Path) -> None:
    """Left padding must not change what the model says: batch of 4 vs batch of 1, greedy."""
    qs = _questions(tmp_path / "pad.jsonl", [dict(q, category="math") for q in QUESTIONS])
    outs = []
    for bs in (4, 1):
        assert gen_mod.main(_cfg(tiny_run, qs, f"eval.batch_size={bs}", "eval.overwrite=true")) == 0
        outs.append([a["choices"][0]["turns"] for a in _answers(tiny_run, "pad")])
    assert outs[0] == outs[1]
    assert len({t for turns in outs[0] for t in turns}) > 1  # not a degenerate constant answer


def test_prompt_longer_than_the_context_is_listed(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    long = " ".join(["word"] * 400)  # more tokens than the tiny model's 256 positions
    qs = _questions(tmp_path / "long.jsonl", [QUESTIONS[3], {"question_id": 99, "category": "generic", "text": long}])
    assert gen_mod.main(_cfg(tiny_run, qs)) == 1
    assert [a["question_id"] for a in _answers(tiny_run, "long")] == [14]
    assert "question 99: turn 1: the prompt fills the model's context" in capsys.readouterr().out


def test_bad_inputs_fail_before_the_model_loads(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gen_mod, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    good = _questions(tmp_path / "good.jsonl", QUESTIONS[:1])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(QUESTIONS[0]) + "\n" + '{"question_id": 2, "turns": ["no category"]}\n')
    with pytest.raises(UsageError, match=r"bad.jsonl:2: 'category' must be a non-empty string"):
        gen_mod.main(_cfg(tiny_run, bad))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(UsageError, match="no judge endpoint configured"):  # before hours of generation
        gen_mod.main(_cfg(tiny_run, good, "eval.require_judge=true"))
    with pytest.raises(UsageError, match="OPENAI_API_KEY is not set"):
        gen_mod.main(_cfg(tiny_run, good, "eval.require_judge=true", "eval.judge.base_url=https://judge.example.com/v1",
                          "eval.judge.model=gpt-4"))
    with pytest.raises(UsageError, match="no final model"):
        gen_mod.main(_cfg(tmp_path, good))
    with pytest.raises(UsageError, match="set eval.run_dir"):
        gen_mod.main(compose([f"eval.questions={good}", "eval.require_judge=false", f"eval.out_dir={tmp_path}"]))


@pytest.mark.parametrize("conversation", [
    [("user", "Hello there, how are you?"), ("assistant", "I am fine, thank you.")],
    [("user", "What is 3 + 4?"), ("assistant", "It is 7."), ("user", "And times two?"), ("assistant", "14.")],
    [("system", "Be brief."), ("user", "Name a colour."), ("assistant", "Blue.")],
])
def test_generation_prompt_is_a_prefix_of_the_training_tokens(conversation: list[tuple[str, str]]) -> None:
    """The ids generation feeds the model are exactly the training ids up to each reply."""
    tok = load_tokenizer(None)
    template = with_special_tokens(OmegaConf.structured(load_option("template", "vicuna_v1.1")), tok)
    messages = [{"role": r, "content": c} for r, c in conversation]
    train_ids, labels = encode_conversation(messages, tok, template)
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render_prompt(messages[:k], template)
        assert prompt.endswith("ASSISTANT:")
        ids = tok(prompt, add_special_tokens=True)["input_ids"]
        assert ids == train_ids[: len(ids)]
        assert ids[0] == tok.bos_token_id
        # training supervises exactly what follows the prompt: the reply starts at the next token
        assert labels[len(ids) - 1] == -100 and labels[len(ids)] == train_ids[len(ids)]
