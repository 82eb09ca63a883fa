"""Encode conversations exactly: ids, assistant-only labels, and the token where each pair starts.

A conversation's ids are always those of its whole rendered text, tokenized once with BOS.

Segments, the usual way: each (user, assistant) pair is its `lead` (template text opening the pair;
the first pair's holds the header too), its `user` segment (the message and the template text
around it, up to the reply) and its `reply` (the supervised part: for Vicuna ` {reply}</s>`). Cuts
lie only where the tokenizer never joins tokens across: next to a structural special token (it
splits there first) or, where the vocabulary proves it (`_word_boundaries_are_cuts`), at a space
after a non-space. A separator token written at each cut has each segment tokenized as on its own,
in one batched call; without the separators the ids are the whole text's. Labels are the replies,
pair starts the leads, and a split piece is its header followed by its pairs' segments. The
template's cuts are checked once per system prompt, those at a message's edges once per message.

Whole text, the fallback (no word cuts, as in byte-level BPE; a message's edge that breaks a cut):
tokenized with offsets, a token is supervised when its characters lie inside a reply.
`segments=False` sends everything this way: the reference of the tests and `bench_data --verify`.

{bos}, {eos} and the template's literal `special_tokens` are written as private-use characters that a
copy of the tokenizer knows as added tokens, while the real special-token strings stay text: so does
`</s>` inside a message. A template's `{cut}` is one more such character, whose token is taken out
after tokenizing: the text on each side is tokenized apart (templates with one go the whole-text way).
"""

from __future__ import annotations

import functools
import re
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from vicuna_exp.data.template import (
    ASSISTANT,
    USER,
    Turn,
    check_template,
    render_spans,
    to_turns,
    with_special_tokens,
)
from vicuna_exp.errors import UsageError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from vicuna_exp.data.config import TemplateConfig

IGNORE = -100
_PRIVATE = 0xF0000  # Supplementary Private Use Area-A: never in real text (checked anyway)
BOS, EOS, SEP = chr(_PRIVATE), chr(_PRIVATE + 1), chr(_PRIVATE + 2)  # written for {bos}, {eos}, at a cut
CUT = chr(_PRIVATE + 3)  # written for a template's {cut}: tokenized apart on each side, then taken out
_SLOTS = tuple(chr(_PRIVATE + 0x100 + i) for i in range(4))  # the messages of a two-pair skeleton
_LITERALS = tuple(chr(_PRIVATE + 0x10 + i) for i in range(0xF0))  # written for a template's special_tokens


class EncodeError(ValueError):
    """A conversation that cannot be encoded exactly; `reason` is the stats.json drop reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class Encoded:
    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32, IGNORE where not supervised
    pair_starts: np.ndarray  # the token holding each (user, assistant) pair's first character
    segments: np.ndarray | None = None  # per pair, where its lead, user and reply segments start (segments only)


@dataclass(frozen=True)
class _Layout:
    """The template's text for one system prompt, cut into segments around the messages."""

    first_lead: str  # the header and the first pair's lead
    first_user: str  # the first pair's user segment, before the message
    lead: str  # a later pair's lead
    user: str  # a later pair's user segment, before the message
    prompt: str  # the user segment after the message (generation prompt)
    reply: str  # the reply segment before the reply
    end: str  # the reply segment after the reply (end of turn)
    pair0: int  # the token holding the first pair's first character


class _Text(NamedTuple):
    """A conversation's text, ready for the tokenizer: segments (a layout) or whole (spans)."""

    text: str
    pairs: int
    layout: _Layout | None = None
    spans: np.ndarray | None = None  # whole text: supervised spans, flat [s0, e0, s1, e1, ...]
    pair_chars: tuple[int, ...] = ()  # whole text: where each pair starts


_BACKENDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {template tokens: backend}


def _template_tokens(template: TemplateConfig) -> list[tuple[str, str, str]]:
    """(key, token, the character written for it) of every special token the template writes."""
    used = [(k, t, c) for k, t, c in (("template.bos_token", template.bos_token, BOS),
                                      ("template.eos_token", template.eos_token, EOS))
            if t is not None]  # no BOS (Qwen): the template never writes {bos} (with_special_tokens)
    return used + [("template.special_tokens", t, c) for t, c in zip(template.special_tokens or (), _LITERALS,
                                                                     strict=False)]


def check_special_tokens(template: TemplateConfig, tokenizer: Any) -> None:
    """A usage error naming the template and every special token it writes that the tokenizer lacks."""
    added = {t.content for t in tokenizer.added_tokens_decoder.values()}
    lacking = [f"{key}: {token!r}" for key, token, _ in _template_tokens(template) if token not in added]
    if lacking:
        raise UsageError(f"{'; '.join(lacking)}: not a special token of the tokenizer "
                         f"{getattr(tokenizer, 'name_or_path', '')!r} (template {template.name!r})")


def _backend(tokenizer: Any, template: TemplateConfig) -> tuple[Any, dict[int, int], bool]:
    """A copy of the tokenizer's backend that knows BOS, EOS, the template's literal special tokens
    and SEP as added tokens, made once per tokenizer and template tokens; with where they map and
    whether special tokens strip whitespace."""
    from tokenizers import AddedToken, Tokenizer

    bos, eos, literals = template.bos_token, template.eos_token, tuple(template.special_tokens or ())
    per_tok = _BACKENDS.setdefault(tokenizer, {})
    if (bos, eos, literals) in per_tok:
        return per_tok[(bos, eos, literals)]
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    used = _template_tokens(template)
    check_special_tokens(template, tokenizer)
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    to_real = {}
    for _key, token, char in used:
        p = added[token]  # the sentinel splits the text exactly as the special token does
        backend.add_tokens([AddedToken(char, single_word=p.single_word, lstrip=p.lstrip, rstrip=p.rstrip,
                                       normalized=False)])
        to_real[backend.token_to_id(char)] = tokenizer.convert_tokens_to_ids(token)
    backend.add_tokens([AddedToken(SEP, normalized=False), AddedToken(CUT, normalized=False)])
    backend.encode_special_tokens = True  # special-token strings inside messages stay text
    per_tok[(bos, eos, literals)] = backend, to_real, any(added[t].lstrip or added[t].rstrip for _, t, _ in used)
    return per_tok[(bos, eos, literals)]


class ConversationEncoder:
    """Batched, exact encoding of conversations with one tokenizer and one template."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, template: TemplateConfig, *, segments: bool = True):
        check_template(template)
        if not getattr(tokenizer, "is_fast", False):
            raise UsageError("model.tokenizer: a fast tokenizer (tokenizer.json) is needed for offsets")
        template = with_special_tokens(template, tokenizer)
        self.template, self.tokenizer = template, tokenizer
        if len(template.special_tokens or ()) > len(_LITERALS):
            raise UsageError(f"template.special_tokens: at most {len(_LITERALS)} tokens")
        self.backend, to_real, strips = _backend(tokenizer, template)
        literals = dict(zip(template.special_tokens or (), _LITERALS, strict=False))
        self.special = {"bos": BOS, "eos": EOS, "cut": CUT, **literals}
        self._structural = frozenset((BOS, EOS, *literals.values()))  # the tokenizer splits next to each
        self._reserved = re.compile("[" + "".join((BOS, EOS, SEP, CUT, *literals.values())) + "]")
        self.sep_id, self.cut_id = self.backend.token_to_id(SEP), self.backend.token_to_id(CUT)
        self._lut = np.arange(self.backend.get_vocab_size(with_added_tokens=True) + 1, dtype=np.int32)
        self._lut[list(to_real)] = list(to_real.values())  # backend id -> real id: one gather per batch
        probe = self.backend.encode("a b", add_special_tokens=True).ids
        bare = self.backend.encode("a b", add_special_tokens=False).ids
        self.front = len(probe) - len(bare)  # tokens the post-processor puts in front (BOS)
        # Segments need cuts at special tokens (none strips whitespace, the post-processor only adds in front).
        self.segments = segments and not strips and probe[self.front:] == bare
        self.word_cut = self.segments and _word_boundaries_are_cuts(self.backend)
        self._layout = functools.cache(self._compile)  # system prompt -> its layout (None: whole text)

    # ------------------------------------------------------------------------------------ text

    def _cut(self, before: str, after: str) -> bool:
        """Whether the tokenizer never joins tokens across the point between these two characters."""
        return (before in self._structural or after in self._structural
                or self.word_cut and after == " " and before != " ")

    def render(self, system: str | None, turns: Sequence[Turn]) -> _Text:
        """The text to tokenize: segments where every cut holds, else whole (EncodeError: refused)."""
        lay = self._layout(system) if self.segments else None
        n = len(turns)
        if lay is None or not n or n % 2 or not all(
                turns[k][0] == USER and turns[k + 1][0] == ASSISTANT and turns[k][1] and turns[k + 1][1]
                for k in range(0, n, 2)):
            return self.render_whole(system, turns)
        parts = [lay.first_lead, SEP] if lay.first_lead else []
        before_user = lay.first_user
        for k in range(0, n, 2):
            user, reply = turns[k][1], turns[k + 1][1]
            if k:
                parts += (SEP, lay.lead, SEP)
            parts += (before_user, user, lay.prompt, SEP, lay.reply, reply, lay.end)
            before_user = lay.user
            if (not self._cut(lay.prompt[-1:] or user[-1], lay.reply[:1] or reply[0])
                    or k + 2 < n and not self._cut(lay.end[-1:] or reply[-1], (lay.lead or lay.user)[0])
                    or self._reserved.search(user) or self._reserved.search(reply)):
                return self.render_whole(system, turns)  # a message's edge breaks a cut, or it is refused
        return _Text("".join(parts), n // 2, lay)

    def render_whole(self, system: str | None, turns: Sequence[Turn]) -> _Text:
        """The whole text with its supervised spans (EncodeError on a reserved character)."""
        if any(map(self._reserved.search, (system or "", *(c for _, c in turns)))):
            raise EncodeError("private_use_char", "message contains a reserved private-use character")
        text, spans, pairs = render_spans(self.template, system, turns, special=self.special)
        return _Text(text, len(pairs), spans=np.asarray(spans, dtype=np.int64).reshape(-1), pair_chars=tuple(pairs))

    def _compile(self, system: str | None) -> _Layout | None:
        """The layout for one system prompt, read off the renderer's output for a two-pair skeleton
        whose messages are single placeholder characters; None when some cut does not hold."""
        if system is not None and self._reserved.search(system):
            return None
        turns = [(USER, _SLOTS[0]), (ASSISTANT, _SLOTS[1]), (USER, _SLOTS[2]), (ASSISTANT, _SLOTS[3])]
        text, spans, pairs = render_spans(self.template, system, turns, special=self.special)
        at = [text.find(s) for s in _SLOTS]
        if any(text.count(s) != 1 for s in _SLOTS) or len(pairs) != 2 or len(spans) != 2 or CUT in text:
            return None
        (p0, p1), ((s0, e0), (s1, e1)) = pairs, spans
        if not (p0 <= at[0] < s0 <= at[1] < e0 == p1 <= at[2] < s1 <= at[3] < e1 == len(text)):
            return None  # not one reply span per pair, from after the message to the pair's end
        prompt, reply, end = text[at[0] + 1:s0], text[s0:at[1]], text[at[1] + 1:p1]
        if (text[at[2] + 1:s1], text[s1:at[3]], text[at[3] + 1:]) != (prompt, reply, end):
            return None
        # the last cut before each user message, inside the template's text
        first = next((i for i in range(at[0] - 1, p0 - 1, -1) if i == 0 or self._cut(text[i - 1], text[i])), None)
        later = next((i for i in range(at[2] - 1, p1, -1) if self._cut(text[i - 1], text[i])), p1)
        lead, user = text[p1:later], text[later:at[2]]
        if (first is None or not user or prompt and reply and not self._cut(prompt[-1], reply[0])
                or end and not self._cut(end[-1], (lead or user)[0])):
            return None  # no cut before a user message inside the template's text, or one that cannot hold
        enc = self.backend.encode(text[:first], add_special_tokens=True)
        pair0 = len(enc.ids) if p0 == first else enc.char_to_token(p0)
        return None if pair0 is None else _Layout(text[:first], text[first:at[0]], lead, user, prompt, reply, end,
                                                  pair0)

    # ------------------------------------------------------------------------------ tokenizing

    def tokenize(self, texts: Sequence[_Text]) -> list[Any]:
        """The batched (multi-core, GIL-free) tokenizer calls; `label` turns their output into examples.
        Segment texts need no offsets, so the tokenizer is asked for ids alone."""
        out: list[Any] = [None] * len(texts)
        for whole, call in ((False, self.backend.encode_batch_fast), (True, self.backend.encode_batch)):
            where = [i for i, t in enumerate(texts) if (t.layout is None) == whole]
            for i, enc in zip(where, call([texts[i].text for i in where], add_special_tokens=True) if where else [],
                              strict=True):
                out[i] = enc
        return out

    def label(self, texts: Sequence[_Text], encodings: Sequence[Any]) -> list[Encoded | EncodeError]:
        return [self._label_whole(t, e) if t.layout is None else self._label_segments(t, e)
                for t, e in zip(texts, encodings, strict=True)]

    def render_many(self, conversations: Iterable[tuple[str | None, Sequence[Turn]]]) -> list[_Text | EncodeError]:
        out: list[_Text | EncodeError] = []
        for system, turns in conversations:
            try:
                out.append(self.render(system, turns))
            except EncodeError as exc:  # refused: counted by reason
                out.append(exc)
        return out

    def encode(self, conversations: Sequence[tuple[str | None, Sequence[Turn]]]) -> list[Encoded | EncodeError]:
        """Encode many (system, turns); a conversation that cannot be encoded gives its EncodeError in place."""
        texts = self.render_many(conversations)
        ok = [t for t in texts if isinstance(t, _Text)]
        it = iter(self.label(ok, self.tokenize(ok)))
        return [t if isinstance(t, EncodeError) else next(it) for t in texts]

    def _label_segments(self, t: _Text, enc: Any) -> Encoded:
        """The segment after the k-th separator (at sep[k]) starts at token sep[k] - k once the
        separators are out; the first lead starts after the front tokens (BOS)."""
        raw = np.asarray(enc.ids, dtype=np.int32)
        sep = np.flatnonzero(raw == self.sep_id)
        ids = self._lut[np.delete(raw, sep)]
        front = [self.front] * (1 if t.layout.first_lead else 2)  # type: ignore[union-attr]
        starts = np.concatenate([front, sep - np.arange(len(sep))]).astype(np.int64)
        if len(starts) != 3 * t.pairs:  # cannot happen: messages hold no reserved character
            raise RuntimeError(f"{len(starts)} segments for {t.pairs} pairs")
        reply = np.repeat(np.r_[False, np.arange(len(starts)) % 3 == 2], np.diff(starts, prepend=0, append=len(ids)))
        labels = np.where(reply, ids, IGNORE).astype(np.int32)
        labels[:1] = IGNORE  # nothing predicts the first token of an example (also keeps packed rows apart)
        segments = starts.reshape(-1, 3)
        pair_starts = segments[:, 0].copy()
        pair_starts[0] = t.layout.pair0  # type: ignore[union-attr]
        return Encoded(ids, labels, pair_starts, segments)

    def _label_whole(self, t: _Text, enc: Any) -> Encoded | EncodeError:
        """Labels from the full offset table: a token is supervised when its characters lie inside a span.
        The tokens of `{cut}` are taken out first."""
        raw = np.asarray(enc.ids, dtype=np.int32)
        offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
        cut = raw == self.cut_id
        removed_before = np.concatenate([[0], np.cumsum(cut)])  # cut tokens before each raw position
        if cut.any():
            raw, offsets = raw[~cut], offsets[~cut]
        ids = self._lut[raw]
        starts, ends = offsets[:, 0], offsets[:, 1]
        empty = ends <= starts  # tokens added by the post-processor (BOS) cover no characters
        i_start = np.searchsorted(t.spans, starts, side="right")
        i_last = np.searchsorted(t.spans, np.maximum(ends - 1, starts), side="right")
        inside = (i_start % 2 == 1) & (i_last == i_start) & ~empty
        outside = ((i_start % 2 == 0) & (i_last == i_start)) | empty
        if not (inside | outside).all():
            bad = int(np.flatnonzero(~(inside | outside))[0])
            return EncodeError("misaligned", f"token {bad} ({starts[bad]}:{ends[bad]}) straddles a supervised span edge")
        labels = np.where(inside, ids, IGNORE).astype(np.int32)
        labels[:1] = IGNORE  # nothing predicts the first token of an example (also keeps packed rows apart)
        n = len(ids)
        pair_starts = [n if tok is None else tok - int(removed_before[tok]) for tok in map(enc.char_to_token, t.pair_chars)]
        return Encoded(ids, labels, np.asarray(pair_starts, dtype=np.int64))

    # ---------------------------------------------------------------------------------- pieces

    def encode_pieces(self, pieces: Sequence[tuple[Encoded, str | None, Sequence[Turn], int, int]]
                      ) -> list[tuple[np.ndarray, np.ndarray] | EncodeError]:
        """(ids, labels) of each piece (whole, system, turns, first, stop): pairs first..stop-1 of a
        conversation rendered on their own, exactly as that text tokenizes whole. From the whole
        conversation's segments: the header, then the pairs' segments; only a first user segment
        that reads differently at the start of a piece is tokenized again."""
        out: list[Any] = [None] * len(pieces)
        again: list[tuple[int, _Text, int, int]] = []  # to tokenize; then the whole's tokens that follow
        for i, (whole, system, turns, first, stop) in enumerate(pieces):
            seg = whole.segments
            if seg is None:  # the piece's own text, tokenized whole
                try:
                    again.append((i, self.render_whole(system, turns[2 * first:2 * stop]), 0, 0))
                except EncodeError as exc:
                    out[i] = exc
                continue
            lay = self._layout(system)
            assert lay is not None
            end = int(seg[stop, 0]) if stop < len(seg) else len(whole.input_ids)
            if first == 0 or lay.first_user == lay.user and lay.first_lead:  # the whole's first user segment
                out[i] = _join(whole.input_ids[:seg[0, 1] if first else 0], whole, int(seg[first, 1]) if first else 0, end)
            else:
                opening = lay.first_user + turns[2 * first][1] + lay.prompt
                again.append((i, _Text(lay.first_lead + SEP + opening if lay.first_lead else opening, 0, lay),
                              int(seg[first, 2]), end))
        for (i, t, begin, end), enc in zip(again, self.tokenize([a[1] for a in again]), strict=True):
            if t.layout is None:
                res = self._label_whole(t, enc)
                out[i] = res if isinstance(res, EncodeError) else (res.input_ids, res.labels)
            else:
                raw = np.asarray(enc.ids, dtype=np.int32)
                out[i] = _join(self._lut[raw[raw != self.sep_id]], pieces[i][0], begin, end)
        return out


def _join(head: np.ndarray, whole: Encoded, begin: int, end: int) -> tuple[np.ndarray, np.ndarray]:
    """A piece: its opening's tokens (unsupervised), then the whole conversation's from `begin` to `end`."""
    return (np.concatenate([head, whole.input_ids[begin:end]]),
            np.concatenate([np.full(len(head), IGNORE, dtype=np.int32), whole.labels[begin:end]]))


def _word_boundaries_are_cuts(backend: Any) -> bool:
    """Whether tokenize(a + " b") is tokenize(a) + tokenize(" b") whenever a ends with a non-space.

    So for SentencePiece-style BPE (LLaMA, Mistral): the space becomes "▁" and BPE only merges
    neighbouring symbols into pieces of the vocabulary; when no piece holds a "▁" after another
    character, no merge joins across such a point. Checked on the vocabulary, not assumed."""
    model, pre = backend.model, backend.pre_tokenizer
    if type(model).__name__ != "BPE" or model.dropout or getattr(model, "ignore_merges", True):
        return False
    if backend.normalizer is not None or type(pre).__name__ != "Metaspace" or pre.replacement != "▁":
        return False
    inner_space = re.compile("[^▁]▁")
    return not any(inner_space.search(piece) for piece in backend.get_vocab(with_added_tokens=False))


def encode_conversation(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerFast,
    template: TemplateConfig,
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one whole conversation, exactly as training encodes it (EncodeError if
    it cannot be). `messages`: ShareGPT turns or chat messages, alternating from the user, optionally
    after one system message. Labels are -100 but on each reply and its end-of-turn token."""
    system, turns = to_turns(messages)
    result = ConversationEncoder(tokenizer, template).encode([(system, turns)])[0]
    if isinstance(result, EncodeError):
        raise result
    return result.input_ids.tolist(), result.labels.tolist()
