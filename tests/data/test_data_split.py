"""Turn-aligned splitting never loses a pair; overflow policies are counted."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from functools import lru_cache

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vicuna_exp.config import load_option
from vicuna_exp.data.clean import Conversation
from vicuna_exp.data.encode import ConversationEncoder
from vicuna_exp.data.split import encode_and_split, overflow_examples, windows
from vicuna_exp.data.tokenizer import load_tokenizer

VICUNA = load_option("template", "vicuna_v1.1")

WORDS = ["what", "is", "the", "capital", "of", "Peru", "Lima", "plus", "7", "12", "café", "你好", "</s>", "USER:"]


@lru_cache(maxsize=16)
def encoder(system: str, segments: bool = True, template: str = "vicuna", tok=None) -> ConversationEncoder:
    tok = tok or load_tokenizer(None)
    t = replace(VICUNA, system=system, bos_token=tok.bos_token, eos_token=tok.eos_token)
    if template == "llama2":
        t = replace(t, system_format="<<SYS>>\n{system}\n<</SYS>>\n\n",
                    user_format="{bos}[INST] {system}{content} [/INST]", assistant_format=" {content} {eos}")
    return ConversationEncoder(tok, t, segments=segments)


@pytest.fixture(scope="module", params=["tiny", "sentencepiece_32k", "llama3"])
def vocab(request, real_vocabulary):
    return load_tokenizer(None) if request.param == "tiny" else real_vocabulary(request.param)


def _supervised(examples) -> list[int]:
    return [int(t) for _, labels in examples for t in labels if t != -100]


def _whole(enc: ConversationEncoder, conv: Conversation) -> list[int]:
    res = encode_and_split([conv], enc, 100_000, "split")
    return _supervised(res.examples[0])


text = st.lists(st.sampled_from(WORDS), min_size=1, max_size=40).map(" ".join)
conversations = st.lists(st.tuples(text, text), min_size=1, max_size=6)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairs=conversations, context=st.sampled_from([24, 48, 96, 160]), system=st.sampled_from(["", "Be brief."]))
def test_split_never_loses_a_pair(pairs, context, system):
    enc = encoder(system)
    conv = Conversation("c", None, [t for q, a in pairs for t in (("user", q), ("assistant", a))])
    res = encode_and_split([conv], enc, context, "split")
    examples = res.examples[0]
    assert all(len(ids) <= context and labels[0] == -100 and ids[0] == 1 for ids, labels in examples)
    # every supervised token of the whole conversation, in order, exactly once
    assert _supervised(examples) == _whole(enc, conv)
    assert int(res.source_tokens[0]) == len(_whole(enc, conv))
    if not res.overflow.get("split_pairs"):  # whole pairs only: every example ends a reply with </s>
        assert all(ids[-1] == 2 and labels[-1] == 2 for ids, labels in examples)


def test_pieces_from_segments_equal_pieces_tokenized_on_their_own(vocab):
    """Pieces built from the whole conversation's segments are exactly each piece's own text
    tokenized whole, labelled from offsets, on the tiny and the real vocabularies."""

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(pairs=conversations, context=st.sampled_from([24, 64, 128]), system=st.sampled_from(["", "Be brief."]),
           template=st.sampled_from(["vicuna", "llama2"]), policy=st.sampled_from(["split", "truncate"]))
    def check(pairs, context, system, template, policy):
        conv = Conversation("c", None, [t for q, a in pairs for t in (("user", q), ("assistant", a))])
        fast = encode_and_split([conv], encoder(system, True, template, vocab), context, policy)
        slow = encode_and_split([conv], encoder(system, False, template, vocab), context, policy)
        assert len(fast.examples[0]) == len(slow.examples[0])
        for (a_ids, a_lab), (b_ids, b_lab) in zip(fast.examples[0], slow.examples[0], strict=True):
            assert a_ids.tolist() == b_ids.tolist() and a_lab.tolist() == b_lab.tolist()
        assert fast.overflow == slow.overflow

    if encoder("", True, "vicuna", vocab).word_cut:  # SentencePiece: the segments are what is tested
        assert encoder("Be brief.", True, "llama2", vocab)._layout(None) is not None
    check()


def test_overflow_policies_on_one_long_pair():
    enc = encoder("")
    reply = " ".join(["Lima"] * 150)
    conv = Conversation("long", None, [("user", "what is the capital of Peru"), ("assistant", reply),
                                       ("user", "plus"), ("assistant", "7")])
    whole = _whole(enc, conv)
    split = encode_and_split([conv], enc, 64, "split")
    assert _supervised(split.examples[0]) == whole and split.overflow["split_pairs"] == 1
    windows = split.examples[0][:-1]
    assert all(len(ids) == 64 for ids, _ in windows[:-1])
    # continuation windows start with BOS and earlier text (unsupervised) before the new tokens
    ids, labels = windows[1]
    assert ids[0] == 1 and (labels[1:64 // 4] == -100).all()
    trunc = encode_and_split([conv], enc, 64, "truncate")
    assert trunc.overflow["truncated_pairs"] == 1 and trunc.overflow["truncated_supervised_tokens"] > 0
    assert len(_supervised(trunc.examples[0])) + trunc.overflow["truncated_supervised_tokens"] == len(whole)
    drop = encode_and_split([conv], enc, 64, "drop")
    assert drop.overflow["dropped_pairs"] == 1 and _supervised(drop.examples[0]) == whole[-2:]
    only_long = Conversation("x", None, conv.turns[:2])
    res = encode_and_split([only_long], enc, 64, "drop")
    assert not res.alive[0] and res.dropped == Counter({"overflow": 1})


@pytest.mark.parametrize("n", [65, 130, 500])
def test_windows_cover_every_token_once(n):
    ids = np.arange(n, dtype=np.int32) + 10
    labels = ids.copy()
    labels[0] = -100
    counts: Counter = Counter()
    out = overflow_examples(ids, labels, 64, "split", counts)
    got = [int(t) for _, y in out for t in y if t != -100]
    assert got == labels[1:].tolist()
    assert all(len(x) <= 64 and x[0] == 10 for x, _ in out)
    for lo, hi in ((1, n), (30, 40), (max(20, n - 70), n)):
        part = windows(ids, labels, lo, hi, 64)
        assert [int(t) for _, y in part for t in y if t != -100] == labels[lo:hi].tolist()
        assert all(len(x) <= 64 for x, _ in part)
        # every window but the stream's very first has at least a quarter context of earlier text
        later = part[1:] if lo == 1 else part
        assert all((y[:64 // 4] == -100).all() for _, y in later)
