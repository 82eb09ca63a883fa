"""Build the packaged tiny tokenizer: LLaMA conventions at a vocabulary a CPU model can afford.

Same pipeline as a converted LLaMA/Mistral SentencePiece tokenizer in transformers 5: BPE with byte
fallback (no character is ever unknown), `<unk>`=0 `<s>`=1 `</s>`=2, byte pieces `<0x00>`..`<0xFF>`
at 3..258, a Metaspace pre-tokenizer (`▁` word boundaries, prefix space on the first piece only),
BOS added and EOS not. Trained on the packaged sample conversations and the template text, so
`vicuna-exp train` with the tiny model needs nothing from outside.

    python -m vicuna_exp.data.build_tokenizer          # rewrites vicuna_exp/assets/tokenizer/
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

from vicuna_exp.config import load_option

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "tokenizer"
SPECIALS = ["<unk>", "<s>", "</s>"]
BYTE_PIECES = [f"<0x{b:02X}>" for b in range(256)]


def _corpus(sample_path: Path) -> Iterator[str]:
    """Every message of the sample, plus the template text that will surround it."""
    records = json.loads(sample_path.read_text(encoding="utf-8"))
    system = load_option("template", "vicuna_v1.1").system
    for _ in range(20):
        yield system
        yield "USER: ASSISTANT: [INST] [/INST] <<SYS>> <</SYS>>"
    for record in records:
        for turn in record.get("conversations") or []:
            value = turn.get("value") if isinstance(turn, dict) else None
            if isinstance(value, str) and value.strip():
                yield value


def build(sample_path: Path, vocab_size: int = 2048) -> str:
    """Train and return the tokenizer as tokenizer.json text."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    # Train with whitespace splitting so no merge crosses a word boundary (SentencePiece's
    # split_by_whitespace), then serve with split=False exactly like converted LLaMA tokenizers.
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIALS) - len(BYTE_PIECES),
        min_frequency=1,
        special_tokens=[],
        limit_alphabet=200,
        show_progress=False,
    )
    trainer_tok.train_from_iterator(_corpus(sample_path), trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]

    vocab: dict[str, int] = {}
    for piece in SPECIALS + BYTE_PIECES:
        vocab[piece] = len(vocab)
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        if piece not in vocab:
            vocab[piece] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in SPECIALS])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tok.to_str(pretty=True)


def write(out_dir: Path, tokenizer_json: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(tokenizer_json + "\n", encoding="utf-8")
    config = {
        # The generic fast class: it serves tokenizer.json as built, where the Llama class would
        # rebuild parts of the pipeline from its own defaults.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    from vicuna_exp.data.make_sample import SAMPLE_PATH

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=Path, default=SAMPLE_PATH)
    parser.add_argument("--out", type=Path, default=TOKENIZER_DIR)
    parser.add_argument("--vocab-size", type=int, default=2048)
    args = parser.parse_args(argv)
    text = build(args.sample, args.vocab_size)
    write(args.out, text)
    print(f"wrote a {len(json.loads(text)['model']['vocab'])}-piece tokenizer to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
