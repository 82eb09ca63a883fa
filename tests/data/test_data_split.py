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
from vicuna_exp.data.encode import ConversationEncoder, EncodeError
from vicuna_exp.data.split import encode_and_split, overflow_examples, windows
from vicuna_exp.data.template import render_segments
from vicuna_exp.data.tokenizer import load_tokenizer

VICUNA = load_option("template", "vicuna_v1.1")

WORDS = ["what", "is", "the", "capital", "of", "Peru", "Lima", "plus", "7", "12", "café", "你好", "</s>", "USER:"]


@lru_cache(maxsize=16)
def encoder(system: str, stitch: bool = True, template: str = "vicuna", compiled: bool = True) -> ConversationEncoder:
    t = replace(VICUNA, system=system)
    if template == "llama2":
        t = replace(VICUNA, system=system, system_format="<<SYS>>\n{system}\n<</SYS>>\n\n",
                           user_format="{bos}[INST] {system}{content} [/INST]", assistant_format=" {content} {eos}")
    enc = ConversationEncoder(load_tokenizer(None), t, stitch=stitch)
    if not compiled:  # as past the compiled layouts' limit: the general renderer, offsets, cuts tried one by one
        enc._layout = lambda system: None
    return enc


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


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairs=conversations, context=st.sampled_from([24, 64, 128]), system=st.sampled_from(["", "Be brief."]),
       template=st.sampled_from(["vicuna", "llama2"]), policy=st.sampled_from(["split", "truncate"]),
       compiled=st.booleans())
def test_stitched_pieces_equal_pieces_tokenized_on_their_own(pairs, context, system, template, policy, compiled):
    """Reusing the whole conversation's tokens after a special token gives exactly the piece's own tokenization."""
    conv = Conversation("c", None, [t for q, a in pairs for t in (("user", q), ("assistant", a))])
    fast = encode_and_split([conv], encoder(system, True, template, compiled), context, policy)
    slow = encode_and_split([conv], encoder(system, False, template), context, policy)
    assert encoder(system, True, template).stitch and encoder(system, True, template).word_cut
    assert len(fast.examples[0]) == len(slow.examples[0])
    for (a_ids, a_lab), (b_ids, b_lab) in zip(fast.examples[0], slow.examples[0], strict=True):
        assert a_ids.tolist() == b_ids.tolist() and a_lab.tolist() == b_lab.tolist()
    assert fast.overflow == slow.overflow


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


odd_text = st.text(alphabet=st.sampled_from(list("ab 你😀é\n\t  x.</s>USER:\u0301\u200b")),
                   min_size=1, max_size=30)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairs=st.lists(st.tuples(odd_text, odd_text), min_size=1, max_size=3))
def test_edge_labels_equal_per_token_labels(pairs):
    """The fast labelling (token indices at span edges) agrees with labelling every token from offsets."""
    enc = encoder("Be brief.")
    segs = render_segments(enc.template, None, [t for q, a in pairs for t in (("user", q), ("assistant", a))])
    r = enc.render(segs)
    encoding = enc.backend.encode(r.text, add_special_tokens=True)
    fast = enc._labels(encoding, r)
    slow = enc._labels_from_offsets(encoding, enc._ids(encoding), r)
    assert type(fast) is type(slow)
    if not isinstance(fast, EncodeError):
        assert fast.labels.tolist() == slow.labels.tolist()
