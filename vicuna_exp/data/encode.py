"""Encode rendered conversations: one tokenization of the whole text, labels from character offsets.

The template's structural special tokens (`</s>` after a reply, a `<s>` between Llama-2 turns) are
written into the text as private-use sentinel characters that a copy of the tokenizer knows as
added tokens, while the real special-token strings are matched as plain text
(`encode_special_tokens`). So a message that contains `</s>`, `<s>` or `USER:` stays text, and
the text around each structural token is split exactly as the tokenizer splits around a special
token. A token is supervised when its characters lie inside a supervised span of the rendering;
a token that straddles a span's edge cannot be aligned and the conversation is reported, never
silently masked.

Most conversations need no offsets at all: where the template compiles to a layout whose
boundaries can be found by counting (`layout.plan_marks`), a marker token is written at each
boundary that is not next to a special token, the tokenizer is asked for ids alone (a fifth less
of its time) and the labels come from where the special tokens and markers fall in the ids.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from vicuna_exp.data.layout import Layout, Marks, PairLayout, Rendered, plan_marks
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
class Marked:
    """A rendering to tokenize without offsets: markers written in at its boundaries (`layout.Marks`)."""

    text: str
    n_pairs: int
    marks: Marks


@dataclass
class Encoded:
    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32, IGNORE where not supervised
    pair_starts: np.ndarray  # index of the first token of each (user, assistant) pair (for splitting)
    rendered: Rendered | Marked | None = None  # kept for stitching pieces of this conversation
    encoding: Any = None  # the tokenizers.Encoding, idem (offsets encodings only)
    openings: np.ndarray | None = None  # marked encodings: where a piece starting at each pair joins the tokens


_BACKENDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {key: sentinel backend}


@dataclass(frozen=True)
class _Backend:
    """A copy of the tokenizer's backend that knows the sentinels and the marker."""

    tokenizer: Any  # tokenizers.Tokenizer
    sentinel_to_real: dict[int, int]
    sentinels: dict[str, str]  # special string -> sentinel character
    marker: str  # written at a boundary that is a word cut (see layout.plan_marks); never in the ids
    marker_id: int
    front: int  # tokens the post-processor puts in front of the text (BOS)
    can_stitch: bool  # pieces can reuse the whole conversation's tokens after a special token
    word_cut: bool  # a space after a non-space is an exact cut


def _sentinel_backend(tokenizer: Any, bos: str, eos: str) -> _Backend:
    """The sentinel backend, made once per tokenizer and template tokens."""
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
    marker = chr(_SENTINEL_BASE + 2)
    backend.add_tokens([AddedToken(marker, single_word=False, lstrip=False, rstrip=False, normalized=False,
                                   special=False)])
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
    per_tok[key] = _Backend(backend, sentinel_to_real, sentinels, marker, backend.token_to_id(marker),
                            len(probe) - len(bare), can_stitch, word_cut)
    return per_tok[key]


class ConversationEncoder:
    """Batched, exact encoding of rendered segments with one tokenizer and one template."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, template: TemplateConfig, *, stitch: bool = True):
        check_template(template)
        if not getattr(tokenizer, "is_fast", False):
            raise UsageError("model.tokenizer: a fast tokenizer (tokenizer.json) is needed for offsets")
        self.template = template
        self.tokenizer = tokenizer
        b = _sentinel_backend(tokenizer, template.bos_token, template.eos_token)
        self.backend = b.tokenizer
        self.sentinels = b.sentinels
        # sentinel id -> real id as a lookup table over the whole vocabulary: one gather per encoding
        size = max(self.backend.get_vocab_size(with_added_tokens=True), max(b.sentinel_to_real) + 1, b.marker_id + 1)
        self._lut = np.arange(size, dtype=np.int32)
        for sentinel_id, real_id in b.sentinel_to_real.items():
            self._lut[sentinel_id] = real_id
        self._is_event = np.zeros(size, dtype=bool)  # the tokens a marked encoding counts: sentinels, marker
        self._is_event[[*b.sentinel_to_real, b.marker_id]] = True
        self.sentinel_chars = tuple(self.sentinels.values())
        self.marker, self._marker_id, self._front = b.marker, b.marker_id, b.front
        self.reserved_chars = (*self.sentinel_chars, self.marker)  # never accepted inside a message
        self.stitch = stitch and b.can_stitch
        self.word_cut = self.stitch and b.word_cut
        self._layouts: dict[str | None, Layout | None] = {}
        self._marks: dict[str | None, Marks | None] = {}

    def render_turns(self, system: str | None, turns: Sequence[tuple[str, str]]) -> Rendered:
        """`render(render_segments(template, system, turns))`, compiled: the same text, spans and pair
        starts, from the template's layout for this system prompt and one join per conversation.

        Anything the layout does not describe exactly (an empty message, turns that do not come in
        (user, assistant) pairs, a reserved character in a message) takes the general path, which
        also raises the EncodeError.
        """
        layout = self._layout(system)
        if layout is None or not _whole_pairs(turns):
            return self.render(render_segments(self.template, system, turns))
        n = len(turns)
        parts = [layout.head]
        bounds = list(layout.head_bounds)
        pair_chars = []
        pos = len(layout.head)
        pair = layout.first
        for k in range(0, n, 2):
            user, reply = turns[k][1], turns[k + 1][1]
            pair_chars.append(pos)
            grow_user, grow_reply = len(user) - 1, len(reply) - 1
            for offset, after_user, after_reply in pair.bounds:
                bounds.append(pos + offset + after_user * grow_user + after_reply * grow_reply)
            parts += (pair.before_user, user, pair.between, reply, pair.after_reply)
            pos += pair.skeleton_length + grow_user + grow_reply
            pair = layout.later
        text = "".join(parts)
        pairs = n // 2
        expected = [h + f + (pairs - 1) * later for h, f, later in
                    zip(layout.head_sentinels, layout.first.sentinels, layout.later.sentinels, strict=True)]
        for ch, count in zip(self.reserved_chars, [*expected, 0], strict=True):
            if text.count(ch) != count:  # a message holds a reserved character
                return self.render(render_segments(self.template, system, turns))
        return Rendered(text, np.asarray(bounds, dtype=np.int64), np.asarray(pair_chars, dtype=np.int64), layout)

    def render_marked(self, system: str | None, turns: Sequence[tuple[str, str]]) -> Marked | Rendered:
        """What training tokenizes: the text with markers at its boundaries where the layout allows
        (`layout.plan_marks`: the ids without offsets), otherwise `render_turns`' rendering."""
        marks = self._marks.get(system, False)
        if marks is False:
            layout = self._layout(system)
            if layout is None:
                return self.render_turns(system, turns)
            marks = self._marks[system] = plan_marks(layout, self.sentinel_chars, self.marker, self.word_cut,
                                                     self._measure)
        if marks is None or not _whole_pairs(turns):
            return self.render_turns(system, turns)
        n = len(turns)
        parts = []
        before_user, between, after_reply = marks.first
        for k in range(0, n, 2):
            parts += (before_user, turns[k][1], between, turns[k + 1][1], after_reply)
            before_user, between, after_reply = marks.later
        text = "".join(parts)
        program = marks.program(n // 2)
        for ch, expected in zip(self.reserved_chars, program.reserved, strict=True):
            if text.count(ch) != expected:  # a message holds a reserved character
                return self.render_turns(system, turns)
        return Marked(text, n // 2, marks)

    def _layout(self, system: str | None) -> Layout | None:
        """The compiled layout for this system prompt (None: render it the general way)."""
        layout = self._layouts.get(system, False)
        if layout is False:
            if len(self._layouts) >= _MAX_LAYOUTS:  # many distinct system prompts: compiling would not pay
                return None
            layout = self._layouts[system] = self._compile(system)
        return layout

    def _measure(self, text: str, at_start: bool) -> list[tuple[int, int]]:
        """Character spans of the tokens of template text, at the start of the text or after a special token."""
        if at_start:
            return self.backend.encode(text, add_special_tokens=False).offsets
        lead = self.sentinel_chars[-1]
        return [(s - 1, e - 1) for s, e in self.backend.encode(lead + text, add_special_tokens=False).offsets[1:]]

    def _compile(self, system: str | None) -> Layout | None:
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

        def pair_layout(region: int, user_at: int, reply_at: int) -> PairLayout:
            lo, hi = regions[region]
            marks = tuple((b - lo, int(b > user_at), int(b > reply_at)) for b in owned[region])
            return PairLayout(text[lo:user_at], text[user_at + 1:reply_at], text[reply_at + 1:hi], marks,
                               count(text[lo:hi]))

        return Layout(text[:p0], tuple(owned[0]), pair_layout(1, where[0], where[1]),
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
                for ch in self.reserved_chars:
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

    def tokenize(self, items: Sequence[Rendered | Marked]) -> list[Any]:
        """The batched (multi-core, GIL-free) tokenizer calls; `label` turns their output into examples.
        Marked renderings need no offsets, so the tokenizer is asked for ids alone."""
        marked = [i for i, r in enumerate(items) if isinstance(r, Marked)]
        if len(marked) == len(items):
            return self.backend.encode_batch_fast([r.text for r in items], add_special_tokens=True) if items else []
        if not marked:
            return self.backend.encode_batch([r.text for r in items], add_special_tokens=True)
        out: list[Any] = [None] * len(items)
        plain = [i for i, r in enumerate(items) if not isinstance(r, Marked)]
        for where, call in ((marked, self.backend.encode_batch_fast), (plain, self.backend.encode_batch)):
            for i, enc in zip(where, call([items[i].text for i in where], add_special_tokens=True), strict=True):
                out[i] = enc
        return out

    def label(self, items: Sequence[Rendered | Marked], encodings: Sequence[Any], *, keep: bool = False
              ) -> list[Encoded | EncodeError]:
        """Labels for tokenized renderings; `keep` retains what stitching pieces needs."""
        marked = [i for i, r in enumerate(items) if isinstance(r, Marked)]
        labelled = iter(self._label_marked([items[i] for i in marked], [encodings[i] for i in marked])
                        if marked else [])
        out: list[Encoded | EncodeError] = []
        for r, enc in zip(items, encodings, strict=True):
            if isinstance(r, Marked):
                res = next(labelled)
                if keep and isinstance(res, Encoded):
                    res.rendered = r
            else:
                res = self._labels(enc, r)
                if keep and isinstance(res, Encoded):
                    res.rendered, res.encoding = r, enc
            out.append(res)
        return out

    def encode_rendered(self, items: Sequence[Rendered | Marked], *, keep: bool = False
                        ) -> list[Encoded | EncodeError]:
        return self.label(items, self.tokenize(items), keep=keep)

    def encode_many(self, conversations: Sequence[tuple[str | None, Sequence[tuple[str, str]]]], *,
                    keep: bool = False) -> list[Encoded | EncodeError]:
        """Encode many (system, turns); a conversation that cannot be encoded gives its EncodeError in place."""
        rendered: list[Rendered | Marked | EncodeError] = []
        for system, turns in conversations:
            try:
                rendered.append(self.render_marked(system, turns))
            except EncodeError as exc:
                rendered.append(exc)
        ok = [r for r in rendered if not isinstance(r, EncodeError)]
        it = iter(self.encode_rendered(ok, keep=keep))
        return [r if isinstance(r, EncodeError) else next(it) for r in rendered]

    def _label_marked(self, items: Sequence[Marked], encodings: Sequence[Any]) -> list[Encoded | EncodeError]:
        """Ids, labels, pair starts and openings of marked renderings, a whole batch in a few array
        operations: a boundary's token is found by counting the special tokens and markers before it.

        The batch's tokens are one array; each conversation gets views of it. Event k of
        conversation c (k = 0: the last token the post-processor puts in front) is `at[base[c] + k]`.
        """
        lengths = np.fromiter(map(len, encodings), dtype=np.int64, count=len(encodings))
        starts = np.zeros(len(items) + 1, dtype=np.int64)
        np.cumsum(lengths, out=starts[1:])
        raw = np.concatenate([np.fromiter(e.ids, dtype=np.int32, count=n) for e, n in zip(encodings, lengths.tolist(),
                                                                                         strict=True)])
        events = np.flatnonzero(self._is_event[raw])
        is_marker = raw[events] == self._marker_id
        markers_before = np.zeros(len(events) + 1, dtype=np.int64)
        np.cumsum(is_marker, out=markers_before[1:])
        first_event = np.searchsorted(events, starts)  # each conversation's first event; then the end
        starts -= markers_before[first_event]  # each conversation's first token once the markers are out
        ids = self._lut[raw[raw != self._marker_id]]
        # every event's token with the markers out, and one more event in front of each conversation
        at = np.insert(events - markers_before[:-1], first_event[:-1], starts[:-1] + self._front - 1)
        base = first_event[:-1] + np.arange(len(items))

        out: list[Encoded | EncodeError | None] = [None] * len(items)
        good: list[int] = []
        programs = []
        for c, r in enumerate(items):
            program = r.marks.program(r.n_pairs)
            found = int(first_event[c + 1] - first_event[c])
            if found + 1 != program.events:  # cannot happen: messages hold no reserved character
                out[c] = EncodeError("misaligned", f"{found} special tokens and markers, expected {program.events - 1}")
            else:
                good.append(c)
                programs.append(program)

        def tokens(event_field: str, add_field: str) -> np.ndarray:
            """The global token index of one kind of boundary, for every good conversation in order."""
            if not programs:
                return np.zeros(0, dtype=np.int64)
            index = np.concatenate([getattr(p, event_field) + base[c] for c, p in zip(good, programs, strict=True)])
            return at[index] + np.concatenate([getattr(p, add_field) for p in programs])

        edges = tokens("span_events", "span_add")
        change = np.zeros(len(ids) + 1, dtype=np.int32)
        np.add.at(change, edges[0::2], 1)
        np.add.at(change, edges[1::2], -1)
        labels = np.where(np.cumsum(change[:-1]) > 0, ids, IGNORE).astype(np.int32)
        labels[starts[:-1]] = IGNORE  # nothing predicts the first token of an example
        pair_starts = tokens("start_events", "start_add")
        openings = tokens("opening_events", "opening_add")
        p_at = o_at = 0
        for c in good:
            a, b, n = int(starts[c]), int(starts[c + 1]), items[c].n_pairs
            opening = np.empty(n, dtype=np.int64)
            opening[0] = -1
            opening[1:] = openings[o_at:o_at + n - 1] - a
            out[c] = Encoded(ids[a:b], labels[a:b], pair_starts[p_at:p_at + n] - a, openings=opening)
            p_at += n
            o_at += n - 1
        return out  # type: ignore[return-value]

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


def _whole_pairs(turns: Sequence[tuple[str, str]]) -> bool:
    """What a compiled layout describes: (user, assistant) pairs, at least one, no empty message."""
    n = len(turns)
    return n > 0 and n % 2 == 0 and all(
        turns[k][0] == USER and turns[k + 1][0] == ASSISTANT and turns[k][1] and turns[k + 1][1]
        for k in range(0, n, 2))


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
