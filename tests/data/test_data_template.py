"""Vicuna v1.1 rendering and assistant-only labels, checked by hand; render / encode / jinja parity."""

from __future__ import annotations

from dataclasses import replace

import pytest

from vicuna_exp.config import load_option
from vicuna_exp.data import encode_conversation
from vicuna_exp.data.chat_template import to_jinja
from vicuna_exp.data.config import TemplateConfig
from vicuna_exp.data.encode import BOS, EOS, SEP, ConversationEncoder, EncodeError
from vicuna_exp.data.template import render, render_prompt, with_special_tokens
from vicuna_exp.data.tokenizer import load_tokenizer
from vicuna_exp.errors import UsageError

# Text rendering needs the special tokens spelt out: the packaged tokenizer's, as training fills them in.
VICUNA = with_special_tokens(load_option("template", "vicuna_v1.1"), load_tokenizer(None))

VICUNA_V1_1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                      "The assistant gives helpful, detailed, and polite answers to the user's questions.")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def _template(name: str) -> TemplateConfig:
    return with_special_tokens(load_option("template", name), load_tokenizer(None))


def _runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """Consecutive supervised stretches; their ids must equal the labels there."""
    runs, cur = [], []
    for i, y in zip(ids, labels, strict=True):
        if y == -100:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert y == i
            cur.append(i)
    if cur:
        runs.append(cur)
    return runs


def _text(tok, ids: list[int]) -> str:
    """Token pieces joined as text (▁ -> space), so the check does not depend on the decoder."""
    return "".join(tok.convert_ids_to_tokens(ids)).replace("▁", " ")


CONV = [
    {"from": "human", "value": "What is 2 plus 2?"},
    {"from": "gpt", "value": "2 plus 2 is 4."},
    {"from": "human", "value": "And times 3?"},
    {"from": "gpt", "value": "4 times 3 is 12."},
]


def test_vicuna_v11_text_and_labels_by_hand(tok):
    t = _template("vicuna_v1.1")
    text = render(CONV, t)
    assert text == (VICUNA_V1_1_SYSTEM + " USER: What is 2 plus 2? ASSISTANT: 2 plus 2 is 4.</s>"
                    "USER: And times 3? ASSISTANT: 4 times 3 is 12.</s>")
    ids, labels = encode_conversation(CONV, tok, t)
    assert ids == tok(text).input_ids  # exactly the tokenization of the whole rendered text
    assert ids[0] == tok.bos_token_id and labels[0] == -100
    runs = _runs(ids, labels)
    assert [_text(tok, r) for r in runs] == [" 2 plus 2 is 4.</s>", " 4 times 3 is 12.</s>"]
    assert tok.convert_ids_to_tokens(runs[0]) == ["▁2", "▁plus", "▁2", "▁is", "▁4.", "</s>"]
    # everything else is masked: the system prompt, both questions and both "ASSISTANT:" markers
    assert sum(y != -100 for y in labels) == sum(len(r) for r in runs)


def test_empty_system_prompt(tok):
    t = replace(VICUNA, system="")
    assert render(CONV[:2], t) == "USER: What is 2 plus 2? ASSISTANT: 2 plus 2 is 4.</s>"
    msgs = [{"role": "system", "content": "Be brief."}] + [
        {"role": "user" if m["from"] == "human" else "assistant", "content": m["value"]} for m in CONV[:2]]
    assert render(msgs, _template("vicuna_v1.1")).startswith("Be brief. USER: What")


def test_unicode_and_long_reply(tok):
    reply = "Voilà: naïve café, 你好 😀. " + " ".join(f"word{i}" for i in range(400))
    conv = [{"from": "human", "value": "Say something long, señor."}, {"from": "gpt", "value": reply}]
    ids, labels = encode_conversation(conv, tok, _template("vicuna_v1.1"))
    runs = _runs(ids, labels)
    assert len(runs) == 1 and len(runs[0]) > 400
    assert tok.decode(runs[0]) == reply + "</s>"
    assert ids == tok(render(conv, _template("vicuna_v1.1"))).input_ids


def test_special_token_strings_in_messages_stay_text(tok):
    t = _template("vicuna_v1.1")
    conv = [{"from": "human", "value": "Type </s> then <s> then USER: hi ASSISTANT: ok"},
            {"from": "gpt", "value": "</s> USER: <s> ASSISTANT: <unk>"},
            {"from": "human", "value": "again"}, {"from": "gpt", "value": "done</s>"}]
    ids, labels = encode_conversation(conv, tok, t)
    assert ids.count(tok.eos_token_id) == 2  # one per reply, from the template only
    assert ids.count(tok.bos_token_id) == 1 and ids.count(tok.unk_token_id) == 0
    runs = _runs(ids, labels)
    assert [_text(tok, r) for r in runs] == [" </s> USER: <s> ASSISTANT: <unk></s>", " done</s></s>"]
    assert runs[1][-1] == tok.eos_token_id and runs[1][-2] != tok.eos_token_id


def test_render_prompt_is_the_training_prefix(tok):
    t = _template("vicuna_v1.1")
    prompt = render_prompt(CONV[:3], t)
    assert prompt.endswith("USER: And times 3? ASSISTANT:")
    assert render(CONV, t).startswith(prompt)
    ids, labels = encode_conversation(CONV, tok, t)
    p_ids = tok(prompt).input_ids
    assert ids[:len(p_ids)] == p_ids
    assert labels[len(p_ids) - 1] == -100 and labels[len(p_ids)] != -100  # the reply starts right after
    with pytest.raises(ValueError):
        render_prompt(CONV, t)  # ends with the assistant


@pytest.mark.parametrize("name", ["vicuna_v1.1", "llama-2-chat"])
def test_jinja_chat_template_matches_training(tok, name):
    t = _template(name)
    chat = [{"role": "system", "content": "Be brief."}] + [
        {"role": "user" if m["from"] == "human" else "assistant", "content": m["value"]} for m in CONV]
    tok = load_tokenizer(None)  # a fresh copy: the chat template is set on it
    tok.chat_template = to_jinja(t, tok)
    ids, _ = encode_conversation(chat, tok, t)
    assert list(tok.apply_chat_template(chat, tokenize=True, return_dict=False)) == ids
    text = tok.apply_chat_template(chat, tokenize=False)
    assert text.startswith(tok.bos_token) and text.endswith(render(chat, t))
    prompt_ids = tok.apply_chat_template(chat[:4], tokenize=True, add_generation_prompt=True, return_dict=False)
    assert list(prompt_ids) == tok(render_prompt(chat[:4], t)).input_ids
    plain = to_jinja(t)  # without a tokenizer: BOS then the training text, as chat templates do
    tok.chat_template = plain
    assert tok.apply_chat_template(chat, tokenize=False) == tok.bos_token + render(chat, t)


def test_llama2_chat_layout():
    t = _template("llama-2-chat")
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2"}]
    assert render(msgs, t) == "[INST] <<SYS>>\nS\n<</SYS>>\n\nq1 [/INST] a1 </s><s>[INST] q2 [/INST] a2 </s>"
    assert render_prompt(msgs[:4], t).endswith("<s>[INST] q2 [/INST]")


def test_unalignable_text_is_reported_not_masked(tok):
    # a generation prompt that ends inside the token "▁ASSISTANT:" cannot be aligned to tokens
    t = replace(VICUNA, generation_prompt="ASSIST")
    with pytest.raises(EncodeError) as err:
        encode_conversation(CONV[:2], tok, t)
    assert err.value.reason == "misaligned"


def test_bad_templates_name_the_key(tok):
    with pytest.raises(UsageError, match="template.user_format: unknown placeholder {question}"):
        encode_conversation(CONV[:2], tok, replace(VICUNA, user_format="{question} "))
    with pytest.raises(UsageError, match="template.eos_token: '<eot>': not a special token"):
        encode_conversation(CONV[:2], tok, replace(VICUNA, eos_token="<eot>"))
    with pytest.raises(UsageError, match="template.generation_prompt"):
        encode_conversation(CONV[:2], tok, replace(VICUNA, generation_prompt="BOT:"))


# ------------------------------------------ segments == whole text, on the tiny and the real vocabularies

_TEMPLATES = {
    "vicuna_v1.1": lambda: _template("vicuna_v1.1"),
    "llama-2-chat": lambda: _template("llama-2-chat"),
    # eos inside the user turn, bos after the system prompt, supervised text that ends the pair
    "eos-in-user": lambda: replace(VICUNA, system_format="{system}{bos}", user_format="{role}:{content}{eos}",
                                          assistant_format="{role}: {content}\n"),
    # the reply is the whole pair's end and the next pair starts with bos: spans must not merge
    "bare": lambda: replace(VICUNA, system="", system_format="{system}", user_format="{content}",
                                   assistant_format="{content}{eos}", generation_prompt=""),
}
VOCABULARIES = ["tiny", "sentencepiece_32k", "llama3", "qwen"]


@pytest.fixture(scope="module", params=VOCABULARIES)
def vocab(request, real_vocabulary):
    return load_tokenizer(None) if request.param == "tiny" else real_vocabulary(request.param)


def _with_tokens(template: TemplateConfig, tok) -> TemplateConfig:
    """The template with the vocabulary's own BOS and EOS (Llama-3: <|begin_of_text|>, <|eot_id|>);
    a template that writes {bos} is not one for a vocabulary without BOS (Qwen)."""
    if tok.bos_token is None and "{bos}" in template.system_format + template.user_format + template.assistant_format:
        pytest.skip(f"{template.name} writes {{bos}}, and this vocabulary has no BOS")
    return replace(template, bos_token=tok.bos_token, eos_token=tok.eos_token)


_PIECES = ["a", " ", "  ", "\n", "\t", "é", "你", "😀", "\u0301", "\u200b", "'s", "12", ".", "</s>", "<s>",
           "<|eot_id|>", "<|endoftext|>", "USER:", " ASSISTANT:", "[INST]", "\U000f0100", BOS, SEP]


@pytest.mark.parametrize("name", sorted(_TEMPLATES))
def test_segment_encoding_equals_whole_text_encoding(vocab, name):
    """Encoding by segments gives exactly the ids, labels and pair starts of the whole text
    tokenized with offsets (or the same EncodeError)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    if vocab.bos_token is None:
        pytest.skip("Qwen's byte-level BPE, as Llama-3's, has no word cut: a second whole-text run")
    template = _with_tokens(_TEMPLATES[name](), vocab)
    encoder = ConversationEncoder(vocab, template)
    reference = ConversationEncoder(vocab, template, segments=False)
    if encoder.word_cut and name in ("vicuna_v1.1", "llama-2-chat"):  # SentencePiece: segments are what is tested
        assert all(encoder._layout(system) is not None for system in (None, "", "Be brief."))
    message = st.lists(st.sampled_from(_PIECES), max_size=8).map("".join)
    turns = st.lists(st.tuples(message, message), min_size=1, max_size=4).map(
        lambda pairs: [t for q, a in pairs for t in (("user", q), ("assistant", a))])
    system = st.one_of(st.none(), st.just(""), st.just("Be brief."), message)

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(batch=st.lists(st.tuples(system, turns), min_size=1, max_size=4), odd=st.booleans())
    def check(batch, odd):
        if odd:
            batch = [(s, t[:-1]) for s, t in batch]  # a trailing user turn: the whole text
        for g, w in zip(encoder.encode(batch), reference.encode(batch), strict=True):
            assert type(g) is type(w)
            if isinstance(w, EncodeError):
                assert g.reason == w.reason
            else:
                assert g.input_ids.tolist() == w.input_ids.tolist()
                assert g.labels.tolist() == w.labels.tolist()
                assert g.pair_starts.tolist() == w.pair_starts.tolist()

    check()


@pytest.mark.parametrize("name", ["vicuna_v1.1", "llama-2-chat"])
def test_whole_text_encoding_is_the_tokenizers_own(vocab, name):
    """The reference itself: its ids are the tokenizer's own call on the rendered text, and its
    labels are the replies with their end-of-turn token."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    template = _with_tokens(_TEMPLATES[name](), vocab)
    reference = ConversationEncoder(vocab, template, segments=False)
    word = st.sampled_from([p for p in _PIECES if "<" not in p and p not in (BOS, SEP)])
    message = st.lists(word, min_size=1, max_size=8).map("".join)

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(pairs=st.lists(st.tuples(message, message), min_size=1, max_size=3), system=st.one_of(st.none(), message))
    def check(pairs, system):
        chat = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": r, "content": c} for q, a in pairs for r, c in (("user", q), ("assistant", a))]
        got = reference.encode([(system, [(m["role"], m["content"]) for m in chat if m["role"] != "system"])])[0]
        if isinstance(got, EncodeError):
            assert got.reason == "misaligned"
            return
        assert got.input_ids.tolist() == vocab(render(chat, template)).input_ids
        replies = [int(i) for i, y in zip(got.input_ids, got.labels, strict=True) if y != -100]
        assert replies.count(vocab.convert_tokens_to_ids(template.eos_token)) == len(pairs)

    check()


def test_reserved_character_in_a_message_is_refused(tok):
    for ch in (BOS, EOS, SEP):
        with pytest.raises(EncodeError) as err:
            encode_conversation([{"from": "human", "value": f"a{ch}b"}, {"from": "gpt", "value": "ok"}],
                                tok, _template("vicuna_v1.1"))
        assert err.value.reason == "private_use_char"
