"""What a template compiled for one system prompt knows: its text around the message slots, where a
split piece joins the whole conversation's tokens, and where each boundary falls in the token stream.

A `Layout` is read off the general renderer's output for a two-pair skeleton (see
`ConversationEncoder.render_turns`): the header, the first pair, then every later pair, rendered
alike. From it:

- `opening`: a later piece (its own header, then pairs k..) reuses the whole conversation's tokens
  from a fixed cut inside pair k's role marker; only the text before the cut is tokenized again.
  Where there is no such cut (Llama-2 puts the system prompt inside the first user turn), a marked
  piece joins them where its first reply starts (`_replies_alike`).
- `plan_marks`: encoding without character offsets. Labels need the token where each reply starts
  and ends, splitting needs the token where each pair starts; asking the tokenizer for offsets
  costs about a fifth of its time. Where every such boundary sits next to a structural special
  token, or at a space after a non-space in the template's own text (an exact cut where the
  vocabulary proves it, `word_cut`), a marker token is written into the text at each boundary of
  the second kind. The n-th special token or marker of the token stream (an "event") is then the
  n-th of the text, so every boundary is found by counting, and removing the markers leaves the
  ids of the unmarked text, token for token. A boundary a few characters past such a cut, inside
  template text (Vicuna's first pair starts at "USER", but its first token is "▁USER", which
  starts at the space before it), is found from the cut: that stretch of template text is
  tokenized once, when the layout is planned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

Anchor = tuple[int, int]  # (event index within its region, tokens after the event to the boundary's token)


@dataclass(frozen=True)
class PairLayout:
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
class Layout:
    """A template's rendering for one system prompt: the header, then the first pair, then every
    later pair (rendered alike, whatever its index)."""

    head: str
    head_bounds: tuple[int, ...]
    first: PairLayout
    later: PairLayout
    head_sentinels: tuple[int, ...]


@dataclass
class Rendered:
    """A rendering ready to tokenize: sentinel text, supervised spans, where each pair starts."""

    text: str
    bounds: np.ndarray  # supervised spans as flat sorted [s0, e0, s1, e1, ...] (character offsets)
    pair_chars: np.ndarray  # character offset where each (user, assistant) pair starts
    layout: Layout | None = None  # the compiled layout it was rendered with (None: the general path)


@dataclass(frozen=True)
class Opening:
    """Where a later piece joins the whole conversation's tokens."""

    offset: int  # the cut in the whole conversation, in characters from the start of the piece's first pair
    prefix: Rendered  # the piece's text before the cut (header and the start of the role marker)


def opening(layout: Layout, sentinel_chars: tuple[str, ...], word_cut: bool) -> Opening | None:
    """The first word boundary of the piece's role marker (rendered as a first pair), when that cut
    holds whatever the messages are: the piece's text after it equals the whole conversation's
    after the same text of the later pair's role marker (Vicuna: "USER:| q" in both; the two
    markers may differ before the cut) and no special token comes before it. None sends every piece
    the general way (render its opening, try each cut)."""
    if not word_cut:
        return None
    first, later, head = layout.first, layout.later, layout.head
    marker = first.before_user
    space = marker.find(" ", 1)
    while space > 0 and marker[space - 1] == " ":
        space = marker.find(" ", space + 1)
    if space <= 0:
        return None  # the boundary falls inside the user's message: depends on the message
    if any(ch in head + marker[:space + 1] for ch in sentinel_chars):
        return None  # a special token comes first: the general way starts there
    if not any(ch in marker[space:] + first.between + first.after_reply for ch in sentinel_chars):
        return None  # no special token in the opening at all: never stitched
    tail = marker[space:]  # the same text after the cut in the piece and in the whole conversation
    if (not later.before_user.endswith(tail) or first.between != later.between
            or first.after_reply != later.after_reply):
        return None
    cut = len(head) + space
    edges = np.minimum(np.asarray(list(layout.head_bounds) + [len(head) + off for off, _, _ in first.bounds],
                                  dtype=np.int64), cut).reshape(-1, 2)
    edges = edges[edges[:, 1] > edges[:, 0]].reshape(-1)
    return Opening(len(later.before_user) - len(tail),
                   Rendered((head + marker)[:cut], edges, np.asarray([len(head)], dtype=np.int64)))


@dataclass(frozen=True)
class Program:
    """Where the boundaries of an n-pair conversation are, as global event indices (event 0 is the
    last token the post-processor puts in front, so that event + 1 is the text's first token)."""

    events: int  # events the token stream must hold, event 0 included
    start_events: np.ndarray
    start_add: np.ndarray  # tokens from the event to the boundary's token
    opening_events: np.ndarray  # pairs 1.. (a piece that starts there joins the whole's tokens there)
    opening_add: np.ndarray
    span_events: np.ndarray  # supervised edges, flat [start, end, start, end, ...]
    span_add: np.ndarray
    reserved: tuple[int, ...]  # how many of each reserved character (sentinels, marker) the text holds


@dataclass(frozen=True, eq=False)
class Marks:
    """A layout with markers written in, and its boundaries as anchors among the events of each
    region: the opening region (the head and the first pair) and a later pair; in a region, event
    -1 is the previous region's last (or event 0, for the opening region)."""

    layout: Layout  # the layout without markers
    opening: Opening | None  # None: a later piece joins the whole's tokens at its first reply
    first: tuple[str, str, str]  # head and before_user, between, after_reply; markers written in
    later: tuple[str, str, str]  # before_user, between, after_reply of any later pair, idem
    events: tuple[int, int]  # events in the opening region, in a later pair
    reserved: tuple[tuple[int, ...], tuple[int, ...]]  # how many of each reserved character, idem
    starts: tuple[Anchor, Anchor]  # the first pair's first token, a later pair's
    later_opening: Anchor
    spans: tuple[tuple[Anchor, ...], tuple[Anchor, ...]]  # supervised edges, first pair and later pairs
    _programs: dict[int, Program] = field(default_factory=dict, repr=False)

    def program(self, n_pairs: int) -> Program:
        prog = self._programs.get(n_pairs)
        if prog is None:
            prog = self._programs[n_pairs] = self._make_program(n_pairs)
        return prog

    def _make_program(self, n: int) -> Program:
        f, later = self.events
        base = np.concatenate([[1], 1 + f + np.arange(n - 1) * later]).astype(np.int64)

        def anchors(first: Sequence[Anchor], rest: Sequence[Anchor], pairs: range) -> tuple[np.ndarray, np.ndarray]:
            chosen = [(k, a) for k in pairs for a in (first if k == 0 else rest)]
            ev = np.asarray([base[k] + e for k, (e, _) in chosen], dtype=np.int64)
            add = np.asarray([d for _, (_, d) in chosen], dtype=np.int64)
            return ev, add

        start_ev, start_add = anchors([self.starts[0]], [self.starts[1]], range(n))
        open_ev, open_add = anchors([], [self.later_opening], range(1, n))
        span_ev, span_add = anchors(self.spans[0], self.spans[1], range(n))
        reserved = tuple(a + (n - 1) * b for a, b in zip(*self.reserved, strict=True))
        return Program(1 + f + (n - 1) * later, start_ev, start_add, open_ev, open_add, span_ev, span_add, reserved)


def plan_marks(layout: Layout, sentinel_chars: tuple[str, ...], marker: str, word_cut: bool,
               measure: Callable[[str, bool], list[tuple[int, int]]]) -> Marks | None:
    """The layout's marks, or None when some boundary cannot be found by counting (such a layout
    is encoded with offsets). `measure(text, at_start)`: the character spans of the tokens of a
    stretch of template text, tokenized as it is at the start of the text or after a special token."""
    op = opening(layout, sentinel_chars, word_cut)
    if not word_cut or layout.head_bounds:
        return None
    if any(not p.after_reply or p.after_reply[-1] not in sentinel_chars for p in (layout.first, layout.later)):
        return None  # a piece must end at a special token, where the next pair starts
    plan = _RegionPlanner(sentinel_chars, marker, measure)
    head = len(layout.head)
    first = plan(list(layout.head), layout.first, None, [head])
    later = plan([], layout.later, layout.first.after_reply[-1], [0] if op is None else [0, op.offset])
    if first is None or later is None:
        return None
    (f_text, f_anchors, f_events, f_exact), (l_text, l_anchors, l_events, l_exact) = first, later
    if op is not None:
        later_opening, later_spans = l_anchors[1], l_anchors[2:]
    elif _replies_alike(layout) and f_exact[1] and l_exact[1]:
        later_opening, later_spans = l_anchors[1], l_anchors[1:]  # a later piece joins at its first reply
    else:
        return None
    reserved = (*sentinel_chars, marker)

    def counts(text: str) -> tuple[int, ...]:
        return tuple(text.count(ch) for ch in reserved)

    return Marks(layout, op, f_text, l_text, (f_events, l_events), (counts("".join(f_text)), counts("".join(l_text))),
                 (f_anchors[0], l_anchors[0]), later_opening, (tuple(f_anchors[1:]), tuple(later_spans)))


def _replies_alike(layout: Layout) -> bool:
    """Whether the text from a pair's first supervised edge (the start of its reply) to its end is
    the same for the first pair and a later one: then a piece whose opening has no fixed cut
    (Llama-2 puts the system prompt inside the first user turn) joins the whole conversation's
    tokens where its first reply starts, and only its opening up to there is tokenized again."""
    edges = []
    for pair in (layout.first, layout.later):
        if not pair.bounds or pair.bounds[0][1:] != (1, 0):
            return False  # no reply, or its supervised part does not start between the two messages
        edges.append(pair.bounds[0][0] - len(pair.before_user) - 1)
    return (layout.first.between[edges[0]:] == layout.later.between[edges[1]:]
            and layout.first.after_reply == layout.later.after_reply)


class _RegionPlanner:
    """Markers and anchors for one region of a layout: its literal text around two message slots."""

    _CONTENT = object()  # a message slot: any text at all

    def __init__(self, sentinel_chars: tuple[str, ...], marker: str, measure: Callable[[str, bool], list[tuple[int, int]]]):
        self.sentinels, self.marker, self.measure = sentinel_chars, marker, measure

    def __call__(self, lead: list[str], pair: PairLayout, prev: str | None, cuts: list[int]
                 ) -> tuple[tuple[str, str, str], list[Anchor], int, list[bool]] | None:
        """The region's text with markers written in, an anchor for each of `cuts` and of the pair's
        span edges (offsets in the pair's skeleton, after `lead`), its number of events, and for
        each anchor whether the stream breaks exactly there. `prev` is the character before the
        region (None at the start of the text)."""
        skeleton: list = [*lead, *pair.before_user, self._CONTENT, *pair.between, self._CONTENT, *pair.after_reply]
        self.skeleton, self.prev = skeleton, prev
        found = []
        exact = []
        for i in [*cuts, *(len(lead) + offset for offset, _, _ in pair.bounds)]:
            anchor = self._locate(i)
            if anchor is None:
                return None
            found.append(anchor)
            exact.append(anchor[1] == i)
        markers = {j for kind, j, _ in found if kind == "marker"}
        marked: list = []
        where: list[int] = []  # each skeleton position's index in `marked`
        for i, item in enumerate(skeleton):
            if i in markers:
                marked.append(self.marker)
            where.append(len(marked))
            marked.append(item)
        events = [j for j, item in enumerate(marked) if item is not self._CONTENT and self._is_event(item)]
        anchors: list[Anchor] = []
        for kind, j, extra in found:
            if kind == "after":
                anchors.append((-1 if j == 0 else events.index(where[j - 1]), 1 + extra))
            elif kind == "at":
                anchors.append((events.index(where[j]), extra))
            else:  # the marker just before position j
                anchors.append((events.index(where[j] - 1), extra))
        slots = [j for j, item in enumerate(marked) if item is self._CONTENT]
        text = ("".join(marked[:slots[0]]), "".join(marked[slots[0] + 1:slots[1]]), "".join(marked[slots[1] + 1:]))
        return text, anchors, len(events), exact

    def _is_event(self, ch: str) -> bool:
        return ch in self.sentinels or ch == self.marker

    def _literal(self, i: int) -> bool:
        item = self.skeleton[i]
        return item is not self._CONTENT and not self._is_event(item)

    def _cut(self, i: int) -> str | None:
        """How the stream breaks at skeleton position i whatever the messages are, if it does."""
        before = self.prev if i == 0 else self.skeleton[i - 1]
        at = self.skeleton[i] if i < len(self.skeleton) else None
        if before is None and i == 0 or isinstance(before, str) and before in self.sentinels:
            return "after"  # after a special token (or what the post-processor puts in front)
        if isinstance(at, str) and at in self.sentinels:
            return "at"
        if at == " " and isinstance(before, str) and before not in (" ", self.marker):
            return "marker"  # a word cut: a marker is written there
        return None

    def _locate(self, i: int) -> tuple[str, int, int] | None:
        """(kind of the cut at or before i, its position, tokens from the cut to the token that
        holds character i). A boundary that is not a cut itself is found from the cut before it,
        when only template text lies between that cut and the next one after it."""
        kind = self._cut(i)
        if kind is not None:
            return kind, i, 0
        if i >= len(self.skeleton) or not self._literal(i):
            return None
        j = i - 1
        while j >= 0 and self._literal(j) and self._cut(j) not in ("after", "marker"):
            j -= 1
        if j < 0 or not self._literal(j):
            return None
        k = i + 1
        while k < len(self.skeleton) and self._literal(k) and self._cut(k) != "marker":
            k += 1
        if k >= len(self.skeleton) or self._cut(k) not in ("marker", "at"):
            return None
        for t, (s, e) in enumerate(self.measure("".join(self.skeleton[j:k]), j == 0 and self.prev is None)):
            if s <= i - j < e:
                return self._cut(j), j, t  # type: ignore[return-value]
        return None
