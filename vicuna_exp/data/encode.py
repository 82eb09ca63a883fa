"""Encode rendered conversations: one tokenization of the whole text, labels from character offsets.

The template's structural special tokens (`</s>` after a reply, a `<s>` between Llama-2 turns) are
written into the text as private-use sentinel characters that a copy of the tokenizer knows as
added tokens, while the real special-token strings are matched as plain text
(`encode_special_tokens`). So a message that contains `</s>`, `<s>` or `USER:` stays text, and
the text around each structural token is split exactly as the tokenizer splits around a special
token. A token is supervised when its characters lie inside a supervised span of the rendering;
a token that straddles a span's edge cannot be aligned and the conversation is reported, never
silently masked.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from vicuna_exp.data.template import ASSISTANT, USER, Segment, check_template, render_segments, to_turns
from vicuna_exp.errors import UsageError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from vicuna_exp.data.config import TemplateConfig

IGNORE = -100
_SENTINEL_BASE = 0xF0000  # Supplementary Private Use Area-A: never in real text (checked anyway)
_SLOT_BASE = 0xF0100  # placeholders for the contents in a compiled layout's skeleton (never output)
_MAX_LAYOUTS = 64  # system prompts compiled per encoder; conversations with others take the general path


class EncodeError(ValueError):
    """A conversation that cannot be encoded exactly; `reason` is the stats.json drop reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class Rendered:
    """A rendering ready to tokenize: sentinel text, supervised spans, where each pair starts."""

    text: str
    bounds: np.ndarray  # supervised spans as flat sorted [s0, e0, s1, e1, ...] (character offsets)
    pair_chars: np.ndarray  # character offset where each (user, assistant) pair starts
    layout: _Layout | None = None  # the compiled layout it was rendered with (None: the general path)


@dataclass
class Encoded:
    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32, IGNORE where not supervised
    pair_starts: np.ndarray  # index of the first token of each (user, assistant) pair (for splitting)
    rendered: Rendered | None = None  # kept for stitching pieces of this conversation
    encoding: Any = None  # the tokenizers.Encoding, idem


@dataclass(frozen=True)
class _PairLayout:
    """One (user, assistant) pair of a skeleton rendering: its text around the two content slots."""

    before_user: str
    between: str  # after the user's content, before the reply
    after_reply: str
    bounds: tuple[tuple[int, int, int], ...]  # supervised edges: (skeleton offset, after user slot, after reply slot)
    sentinels: tuple[int, ...]  # how many of each sentinel the pair's literal text holds

    @property
    def skeleton_length(self) -> int:  # the placeholders count one character each
        return len(self.before_user) + len(self.between) + len(self.after_reply) + 2


@dataclass(frozen=True)
class _Layout:
    """A template's rendering for one system prompt, compiled from a two-pair skeleton: the header,
    then the first pair, then every later pair (rendered alike, whatever its index)."""

    head: str
    head_bounds: tuple[int, ...]
    first: _PairLayout
    later: _PairLayout
    head_sentinels: tuple[int, ...]


_BACKENDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {key: sentinel backend}


def _sentinel_backend(tokenizer: Any, bos: str, eos: str
                      ) -> tuple[Any, dict[int, int], dict[str, str], bool, bool]:
    """A copy of the tokenizer's backend that knows the sentinels, made once per tokenizer and template tokens.

    Returns (backend, sentinel id -> real id, special string -> sentinel character, pieces can be
    stitched from the whole conversation's tokens, a space after a non-space is an exact cut).
    """
    from tokenizers import AddedToken, Tokenizer

    key = (bos, eos, len(tokenizer), tuple(sorted(str(t) for t in tokenizer.added_tokens_decoder.values())))
    per_tok = _BACKENDS.setdefault(tokenizer, {})
    if key in per_tok:
        return per_tok[key]
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    sentinels: dict[str, str] = {}
    sentinel_to_real: dict[int, int] = {}
    strips = False
    for i, (name, token) in enumerate((("template.bos_token", bos), ("template.eos_token", eos))):
        real_id = tokenizer.convert_tokens_to_ids(token)
        if token not in added or real_id is None:
            raise UsageError(f"{name}: {token!r} is not a special token of the tokenizer "
                             f"{getattr(tokenizer, 'name_or_path', '')!r}")
        proto = added[token]
        strips = strips or proto.lstrip or proto.rstrip
        char = chr(_SENTINEL_BASE + i)
        backend.add_tokens([AddedToken(char, single_word=proto.single_word, lstrip=proto.lstrip,
                                       rstrip=proto.rstrip, normalized=False, special=False)])
        sentinel_to_real[backend.token_to_id(char)] = int(real_id)
        sentinels[token] = char
    backend.encode_special_tokens = True  # special-token strings inside messages stay text
    # Text between structural special tokens is tokenized independently of its neighbours (the
    # tokenizer splits on added tokens first), so a piece of a conversation can reuse the whole
    # conversation's tokens after its first special token. That holds when the special tokens
    # strip no whitespace and the post-processor only adds tokens in front (BOS).
    probe = backend.encode("a b", add_special_tokens=True).ids
    bare = backend.encode("a b", add_special_tokens=False).ids
    can_stitch = not strips and probe[len(probe) - len(bare):] == bare
    # Checked once per tokenizer (it scans the whole vocabulary), not once per preparation.
    word_cut = can_stitch and _word_boundaries_are_cuts(backend)
    per_tok[key] = (backend, sentinel_to_real, sentinels, can_stitch, word_cut)
    return per_tok[key]


class ConversationEncoder:
    """Batched, exact encoding of rendered segments with one tokenizer and one template."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, template: TemplateConfig, *, stitch: bool = True):
        check_template(template)
        if not getattr(tokenizer, "is_fast", False):
            raise UsageError("model.tokenizer: a fast tokenizer (tokenizer.json) is needed for offsets")
        self.template = template
        self.tokenizer = tokenizer
        backend, sentinel_to_real, self.sentinels, can_stitch, word_cut = _sentinel_backend(
            tokenizer, template.bos_token, template.eos_token)
        self.backend = backend
        # sentinel id -> real id as a lookup table over the whole vocabulary: one gather per encoding
        self._lut = np.arange(max(backend.get_vocab_size(with_added_tokens=True), max(sentinel_to_real) + 1),
                              dtype=np.int32)
        for sentinel_id, real_id in sentinel_to_real.items():
            self._lut[sentinel_id] = real_id
        self.sentinel_chars = tuple(self.sentinels.values())
        self.stitch = stitch and can_stitch
        self.word_cut = self.stitch and word_cut
        self._layouts: dict[str | None, _Layout | None] = {}

    def render_turns(self, system: str | None, turns: Sequence[tuple[str, str]]) -> Rendered:
        """`render(render_segments(template, system, turns))`, compiled: the same text, spans and pair
        starts, from the template's layout for this system prompt and one join per conversation.

        Anything the layout does not describe exactly (an empty message, turns that do not come in
        (user, assistant) pairs, a reserved character in a message) takes the general path, which
        also raises the EncodeError.
        """
        layout = self._layouts.get(system, False)
        if layout is False:
            if len(self._layouts) >= _MAX_LAYOUTS:  # many distinct system prompts: compiling would not pay
                return self.render(render_segments(self.template, system, turns))
            layout = self._layouts[system] = self._compile(system)
        n = len(turns)
        if layout is None or n == 0 or n % 2:
            return self.render(render_segments(self.template, system, turns))
        parts = [layout.head]
        bounds = list(layout.head_bounds)
        pair_chars = []
        pos = len(layout.head)
        pair = layout.first
        for k in range(0, n, 2):
            (user_role, user), (reply_role, reply) = turns[k], turns[k + 1]
            if user_role != USER or reply_role != ASSISTANT or not user or not reply:
                return self.render(render_segments(self.template, system, turns))
            pair_chars.append(pos)
            grow_user, grow_reply = len(user) - 1, len(reply) - 1
            for offset, after_user, after_reply in pair.bounds:
                bounds.append(pos + offset + after_user * grow_user + after_reply * grow_reply)
            parts += (pair.before_user, user, pair.between, reply, pair.after_reply)
            pos += pair.skeleton_length + grow_user + grow_reply
            pair = layout.later
        text = "".join(parts)
        pairs = n // 2
        for i, ch in enumerate(self.sentinel_chars):
            expected = layout.head_sentinels[i] + layout.first.sentinels[i] + (pairs - 1) * layout.later.sentinels[i]
            if text.count(ch) != expected:  # a message holds a reserved character
                return self.render(render_segments(self.template, system, turns))
        return Rendered(text, np.asarray(bounds, dtype=np.int64), np.asarray(pair_chars, dtype=np.int64), layout)

    def _compile(self, system: str | None) -> _Layout | None:
        """The layout for one system prompt, read off the general renderer's output for a two-pair
        skeleton whose contents are single placeholder characters; None when it cannot be exact."""
        slots = [chr(_SLOT_BASE + i) for i in range(4)]
        if system is not None and any(ch in system for ch in slots):
            return None
        turns = [(USER, slots[0]), (ASSISTANT, slots[1]), (USER, slots[2]), (ASSISTANT, slots[3])]
        try:
            r = self.render(render_segments(self.template, system, turns))
        except (EncodeError, ValueError):
            return None
        text = r.text
        where = [text.find(ch) for ch in slots]
        if any(text.count(ch) != 1 for ch in slots) or where != sorted(where) or len(r.pair_chars) != 2:
            return None
        p0, p1 = (int(x) for x in r.pair_chars)
        if not p0 <= where[0] < where[1] < p1 <= where[2]:
            return None
        regions = ((0, p0), (p0, p1), (p1, len(text)))
        edges = r.bounds.tolist()
        owned: list[list[int]] = [[], [], []]  # each region's span edges
        for s, e in zip(edges[::2], edges[1::2], strict=True):
            inside = [i for i, (lo, hi) in enumerate(regions) if lo <= s and e <= hi]
            if not inside:
                return None  # a supervised span crosses a pair boundary
            owned[inside[0]] += (s, e)
        if owned[2] and owned[2][0] == p1 and owned[2][-1] == len(text):
            return None  # two later pairs' spans would touch and merge into one

        def count(part: str) -> tuple[int, ...]:
            return tuple(part.count(ch) for ch in self.sentinel_chars)

        def pair_layout(region: int, user_at: int, reply_at: int) -> _PairLayout:
            lo, hi = regions[region]
            marks = tuple((b - lo, int(b > user_at), int(b > reply_at)) for b in owned[region])
            return _PairLayout(text[lo:user_at], text[user_at + 1:reply_at], text[reply_at + 1:hi], marks,
                               count(text[lo:hi]))

        return _Layout(text[:p0], tuple(owned[0]), pair_layout(1, where[0], where[1]),
                       pair_layout(2, where[2], where[3]), count(text[:p0]))

    def render(self, segments: Sequence[Segment]) -> Rendered:
        """Sentinel text and supervised spans of a rendering (EncodeError on a reserved character)."""
        parts: list[str] = []
        bounds: list[int] = []
        pair_chars: list[int] = []
        pos = 0
        for seg in segments:
            if seg.pair >= len(pair_chars):
                pair_chars.append(pos)
            text = self.sentinels[seg.text] if seg.special else seg.text
            if not seg.special:
                for ch in self.sentinel_chars:
                    if ch in text:
                        raise EncodeError("private_use_char", "message contains a reserved private-use character")
            if seg.supervised:
                if bounds and bounds[-1] == pos:
                    bounds[-1] = pos + len(text)  # extend the previous span
                else:
                    bounds.extend((pos, pos + len(text)))
            parts.append(text)
            pos += len(text)
        return Rendered("".join(parts), np.asarray(bounds, dtype=np.int64), np.asarray(pair_chars, dtype=np.int64))

    def tokenize(self, items: Sequence[Rendered]) -> list[Any]:
        """The batched (multi-core, GIL-free) tokenizer call; `label` turns its output into examples."""
        return self.backend.encode_batch([r.text for r in items], add_special_tokens=True) if items else []

    def label(self, items: Sequence[Rendered], encodings: Sequence[Any], *, keep: bool = False
              ) -> list[Encoded | EncodeError]:
        """Labels for tokenized renderings; `keep` retains what stitching pieces needs."""
        out: list[Encoded | EncodeError] = []
        for r, enc in zip(items, encodings, strict=True):
            res = self._labels(enc, r)
            if keep and isinstance(res, Encoded):
                res.rendered, res.encoding = r, enc
            out.append(res)
        return out

    def encode_rendered(self, items: Sequence[Rendered], *, keep: bool = False) -> list[Encoded | EncodeError]:
        return self.label(items, self.tokenize(items), keep=keep)

    def encode_many(self, conversations: Sequence[tuple[str | None, Sequence[tuple[str, str]]]], *,
                    keep: bool = False) -> list[Encoded | EncodeError]:
        """Encode many (system, turns); a conversation that cannot be encoded gives its EncodeError in place."""
        rendered: list[Rendered | EncodeError] = []
        for system, turns in conversations:
            try:
                rendered.append(self.render_turns(system, turns))
            except EncodeError as exc:
                rendered.append(exc)
        ok = [r for r in rendered if isinstance(r, Rendered)]
        it = iter(self.encode_rendered(ok, keep=keep))
        return [next(it) if isinstance(r, Rendered) else r for r in rendered]

    def _ids(self, enc: Any) -> np.ndarray:
        ids = np.array(enc.ids, dtype=np.int32)
        return np.take(self._lut, ids, out=ids)  # every id is in the backend's vocabulary, so in the table

    def _labels(self, enc: Any, r: Rendered) -> Encoded | EncodeError:
        """Labels from the token indices at the supervised spans' edges (no per-token Python work)."""
        ids = self._ids(enc)
        n = len(ids)
        labels = np.full(n, IGNORE, dtype=np.int32)
        text_len = len(r.text)
        for s, e in r.bounds.reshape(-1, 2).tolist():
            a = enc.char_to_token(s)
            last = enc.char_to_token(e - 1)
            if a is None or last is None:
                return self._labels_from_offsets(enc, ids, r)  # a character no token covers: the slow path
            if enc.token_to_chars(a)[0] < s:
                return EncodeError("misaligned", f"token {a} starts before the supervised span at {s}")
            if e < text_len:
                c = enc.char_to_token(e)
                if c is None:
                    return self._labels_from_offsets(enc, ids, r)
                if c == last or enc.token_to_chars(c)[0] < e:
                    return EncodeError("misaligned", f"token {c} straddles the end of the supervised span at {e}")
            else:
                c = last + 1
                span = enc.token_to_chars(last)
                while c < n and enc.token_to_chars(c) == span:  # several byte tokens of one character
                    c += 1
            labels[a:c] = ids[a:c]
        return self._finish(ids, labels, enc, r)

    def _labels_from_offsets(self, enc: Any, ids: np.ndarray, r: Rendered) -> Encoded | EncodeError:
        """Per-token labels from the full offset table: exact whatever characters the tokens skip."""
        offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
        starts, ends = offsets[:, 0], offsets[:, 1]
        empty = ends <= starts  # tokens added by the post-processor (BOS) cover no characters
        i_start = np.searchsorted(r.bounds, starts, side="right")
        i_last = np.searchsorted(r.bounds, np.maximum(ends - 1, starts), side="right")
        inside = (i_start % 2 == 1) & (i_last == i_start) & ~empty
        outside = ((i_start % 2 == 0) & (i_last == i_start)) | empty
        if not (inside | outside).all():
            bad = int(np.flatnonzero(~(inside | outside))[0])
            return EncodeError("misaligned", f"token {bad} ({starts[bad]}:{ends[bad]}) straddles a supervised span edge")
        return self._finish(ids, np.where(inside, ids, IGNORE), enc, r)

    @staticmethod
    def _finish(ids: np.ndarray, labels: np.ndarray, enc: Any, r: Rendered) -> Encoded:
        if len(labels):
            labels[0] = IGNORE  # nothing predicts the first token of an example (also keeps packed rows apart)
        # the token that holds a pair's first character (it may begin with the space before it)
        n = len(ids)
        pair_starts = np.array([n if t is None else t for t in map(enc.char_to_token, r.pair_chars.tolist())],
                               dtype=np.int64)
        return Encoded(ids.astype(np.int32, copy=False), labels.astype(np.int32, copy=False), pair_starts)


def _word_boundaries_are_cuts(backend: Any) -> bool:
    """True when text splits exactly at a space that follows a non-space: tokenize(a + " b") is
    tokenize(a) + tokenize(" b") whenever a ends with a non-space.

    Holds for SentencePiece-style BPE (LLaMA, Mistral): the space becomes "▁" and BPE only merges
    neighbouring symbols into pieces of the vocabulary. When no piece holds a "▁" after another
    character, no merge can ever join across such a point, so the merges on each side happen
    exactly as they would alone. Checked on the vocabulary, not assumed.
    """
    import re

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
    """(input_ids, labels) of one whole conversation, exactly as training encodes it.

    `messages`: ShareGPT turns (`from`/`value`) or chat messages (`role`/`content`), alternating
    from the user, optionally after one system message. Labels are -100 except on each assistant
    reply and its end-of-turn token. Raises EncodeError if the text cannot be aligned.
    """
    system, turns = to_turns(messages)
    result = ConversationEncoder(tokenizer, template).encode_many([(system, turns)])[0]
    if isinstance(result, EncodeError):
        raise result
    return result.input_ids.tolist(), result.labels.tolist()
