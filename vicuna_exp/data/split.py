"""Turn-aligned splitting: conversations longer than the context become several whole-pair examples.

Planning uses the token lengths of the whole-conversation encoding. Every piece then gets exactly
the ids that its own rendering (system prompt, then its pairs) tokenizes to: text after a special
token is tokenized independently of what precedes it, so a piece reuses the whole conversation's
tokens from its first special token on (or from the first word boundary of its first pair, where
the vocabulary proves that cut exact) and only the text before that, the system prompt and role
marker that recur across pieces, is tokenized again, once per distinct text. A piece that
still does not fit gives up its last pair to a piece of its own. A single pair longer than the
context follows `data.overflow`: `split` (windows over the conversation's token stream: the reply
continues in further windows, each preceded by as much earlier text as fits, unsupervised),
`truncate` (the pair on its own, cut at the context: the Alpaca-style arm) or `drop`.
"""

from __future__ import annotations

import functools
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from vicuna_exp.choices import Overflow
from vicuna_exp.data.encode import IGNORE, Encoded, EncodeError, Marked, Rendered
from vicuna_exp.data.layout import opening

if TYPE_CHECKING:
    from vicuna_exp.data.clean import Conversation
    from vicuna_exp.data.encode import ConversationEncoder

ENCODE_CHUNK = 256  # conversations per batched tokenizer call (small: keeps the pipeline overlapped)
FIRST_CHUNK = 32  # the first call's size, doubling up to ENCODE_CHUNK: the tokenizer starts at once
IN_FLIGHT = 3  # batches queued on the tokenizer while this thread labels one
TOKENIZE_WORKERS = 2  # batched tokenizer calls running at once (each uses every core)
Example = tuple[np.ndarray, np.ndarray]  # (input_ids, labels)

MIN_CONTEXT_FRACTION = 4  # a continuation window starts with at least context // 4 tokens of earlier text
SURE_OVERFLOW = 16  # a lone pair estimated this many tokens over the context is windowed without re-tokenizing


@dataclass
class Piece:
    conv: int  # index of the conversation
    first: int  # first pair
    stop: int  # one past the last pair


def plan_pieces(conv: int, enc: Encoded, n_pairs: int, context: int) -> list[Piece]:
    """Greedy runs of whole pairs whose estimated length (header + pairs) fits the context."""
    total = len(enc.input_ids)
    starts = list(enc.pair_starts.tolist()) + [total]
    header = starts[0]
    pieces: list[Piece] = []
    i = 0
    while i < n_pairs:
        length = header + starts[i + 1] - starts[i]
        j = i + 1
        while j < n_pairs and length + starts[j + 1] - starts[j] <= context:
            length += starts[j + 1] - starts[j]
            j += 1
        pieces.append(Piece(conv, i, j))
        i = j
    return pieces


def windows(ids: np.ndarray, labels: np.ndarray, lo: int, hi: int, context: int) -> list[Example]:
    """Examples that together supervise every token of `ids[lo:hi]` once (`overflow=split`).

    Each window is BOS followed by a stretch of the token stream: new tokens (labels kept) preceded
    by as much earlier text as fits (labels -100), at least a quarter of the context after the
    first window. Windows with nothing supervised are left out.
    """
    min_ctx = max(1, context // MIN_CONTEXT_FRACTION)
    step = max(1, context - 1 - min_ctx)  # new tokens per window; the rest is earlier text
    out: list[Example] = []
    a = max(lo, 1)
    while a < hi:
        b = min(hi, max(a + step, context))
        begin = max(1, b - (context - 1))  # as much earlier text as fits, after a BOS
        if (labels[a:b] != IGNORE).any():
            x, y = ids[begin - 1:b].copy(), labels[begin - 1:b].copy()  # one token early: room for the BOS
            x[0] = ids[0]
            y[:1 + a - begin] = IGNORE
            out.append((x, y))
        a = b
    return out


def overflow_examples(ids: np.ndarray, labels: np.ndarray, context: int, policy: Overflow,
                      counts: Counter) -> list[Example]:
    """Examples for one pair, rendered on its own, that does not fit the context (counted in `counts`)."""
    supervised = int((labels != IGNORE).sum())
    if policy == Overflow.drop:
        counts["dropped_pairs"] += 1
        counts["dropped_supervised_tokens"] += supervised
        return []
    if policy == Overflow.truncate:
        counts["truncated_pairs"] += 1
        kept = labels[:context]
        counts["truncated_supervised_tokens"] += supervised - int((kept != IGNORE).sum())
        return [(ids[:context], kept)] if (kept != IGNORE).any() else []
    counts["split_pairs"] += 1
    out = windows(ids, labels, 1, len(ids), context)
    counts["overflow_windows"] += len(out)
    return out


@dataclass
class SplitResult:
    convs: list[Conversation] = field(default_factory=list)  # every conversation consumed, in order
    examples: dict[int, list[Example]] = field(default_factory=dict)  # conversation index -> its examples
    source_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # whole-conversation supervised tokens
    alive: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # kept (encodable, at least one example)
    dropped: Counter = field(default_factory=Counter)  # records, by reason
    dropped_examples: Counter = field(default_factory=Counter)  # pieces that failed to encode, by reason
    overflow: Counter = field(default_factory=Counter)


def encode_and_split(
    convs: Iterable[Conversation], encoder: ConversationEncoder, context: int, overflow_policy: Overflow,
    on_chunk: Callable[[SplitResult, int, int], None] | None = None,
) -> SplitResult:
    """Encode every conversation whole; those longer than the context become whole-pair pieces.

    Pipelined: the tokenizer (Rust, all cores, without the GIL) works on the next chunks in a
    background thread while this thread reads, cleans (when `convs` is a lazy stream), renders
    and labels, so the Python work hides behind it. `on_chunk(result, start, stop)` is called as
    soon as conversations `start:stop` have their examples (it may take them out of `examples`),
    so whatever the caller does with them overlaps the tokenizer too.
    """
    from concurrent.futures import ThreadPoolExecutor

    chunks = _chunks(iter(convs))
    res = SplitResult()
    source: list[int] = []
    alive: list[bool] = []

    # Two batches tokenized at a time: while one batch's results wait for the GIL (this thread
    # holds it while labelling), the other keeps the tokenizer's threads busy; batches still
    # finish about in order, so this thread labels one while the next ones are tokenized.
    with ThreadPoolExecutor(max_workers=TOKENIZE_WORKERS) as pool:
        def submit():  # noqa: ANN202 - the next chunk, rendered and queued on the tokenizer (None at the end)
            chunk = next(chunks, None)
            if chunk is None:
                return None
            start = len(res.convs)
            res.convs.extend(chunk)
            source.extend([0] * len(chunk))
            alive.extend([True] * len(chunk))
            items: list[Rendered | Marked | EncodeError] = []
            for c in chunk:
                try:
                    items.append(encoder.render_marked(c.system, c.turns))
                except EncodeError as exc:
                    items.append(exc)
            ok = [r for r in items if not isinstance(r, EncodeError)]
            return start, items, ok, pool.submit(encoder.tokenize, ok)

        ahead: deque = deque()
        exhausted = False
        while True:
            while not exhausted and len(ahead) <= IN_FLIGHT:  # this chunk and IN_FLIGHT more queued
                nxt = submit()
                if nxt is None:
                    exhausted = True
                else:
                    ahead.append(nxt)
            if not ahead:
                break
            start, items, ok, future = ahead.popleft()
            labelled = iter(encoder.label(ok, future.result(), keep=True))
            encoded = [r if isinstance(r, EncodeError) else next(labelled) for r in items]
            _split_chunk(start, encoded, res.convs, encoder, context, overflow_policy, res, source, alive)
            if on_chunk is not None:
                on_chunk(res, start, start + len(items))
    res.source_tokens = np.asarray(source, dtype=np.int64)
    res.alive = np.asarray(alive, dtype=bool)
    return res


def _chunks(stream: Iterator[Conversation]) -> Iterator[list[Conversation]]:
    """Batches for the tokenizer: small at first, so it starts at once, then ENCODE_CHUNK; and small
    again at the very end (halving), so that little is left to label once the tokenizer is done.
    The stream is read one batch ahead, to see its end coming."""
    buffer: deque = deque()
    size = FIRST_CHUNK
    ended = False
    while True:
        while not ended and len(buffer) < 2 * size:
            conv = next(stream, None)
            if conv is None:
                ended = True
            else:
                buffer.append(conv)
        if not buffer:
            return
        take = size if not ended else max(FIRST_CHUNK // 2, min(size, -(-len(buffer) // 2)))
        yield [buffer.popleft() for _ in range(min(take, len(buffer)))]
        size = min(2 * size, ENCODE_CHUNK)


def _split_chunk(start: int, encoded: list[Encoded | EncodeError], convs: Sequence[Conversation],
                 encoder: ConversationEncoder, context: int, policy: Overflow, res: SplitResult,
                 source: list[int], alive: list[bool]) -> None:
    pending: list[Piece] = []
    wholes: dict[int, Encoded] = {}
    for k, enc in enumerate(encoded):
        ci = start + k
        if isinstance(enc, EncodeError):
            res.dropped[enc.reason] += 1
            alive[ci] = False
            continue
        source[ci] = int(np.count_nonzero(enc.labels != IGNORE))
        if len(enc.input_ids) <= context:
            res.examples[ci] = [(enc.input_ids, enc.labels)]
        else:
            wholes[ci] = enc
            pending.extend(plan_pieces(ci, enc, len(convs[ci].turns) // 2, context))
    res.overflow["split_conversations"] += len(wholes)
    _encode_pieces(pending, wholes, convs, encoder, context, policy, res)
    for ci in range(start, start + len(encoded)):
        if alive[ci] and not res.examples.get(ci):
            alive[ci] = False
            res.dropped["overflow"] += 1  # every pair was longer than the context (overflow=drop)


def _encode_pieces(pending: list[Piece], wholes: dict[int, Encoded], convs: Sequence[Conversation],
                   encoder: ConversationEncoder, context: int, policy: Overflow, res: SplitResult) -> None:
    """Each piece gets the ids of its own rendering; one that still does not fit gives up its last pair."""
    pieces: dict[tuple[int, int], list[Example]] = {}
    while pending:
        built: list[Example | EncodeError] = []
        prefixes: list[Rendered] = []  # stitched pieces: only the text before the first special token
        tails: list[tuple[int, Example]] = []
        full: list[tuple[int, tuple[str | None, list]]] = []  # pieces tokenized whole (no stitching possible)
        early: dict[int, list[Example]] = {}  # lone pairs that certainly overflow: windowed at once
        for i, p in enumerate(pending):
            conv = convs[p.conv]
            if policy == Overflow.split and p.stop - p.first == 1 and _estimate(wholes[p.conv], p) > context + SURE_OVERFLOW:
                built.append(EncodeError("pending", ""))
                early[i] = _overflow(p, None, wholes[p.conv], context, policy, res)
                continue
            stitched = _stitch(encoder, wholes[p.conv], conv, p, len(conv.turns) // 2)
            built.append(EncodeError("pending", ""))
            if stitched is None:
                full.append((i, (conv.system, conv.turns[2 * p.first:2 * p.stop])))
            elif isinstance(stitched, tuple) and isinstance(stitched[0], Rendered):
                prefixes.append(stitched[0])
                tails.append((i, stitched[1]))
            else:
                built[i] = stitched  # type: ignore[assignment]
        for (i, (tail_ids, tail_labels)), enc in zip(tails, _encode_prefixes(encoder, prefixes), strict=True):
            if isinstance(enc, EncodeError):
                built[i] = enc
            else:
                built[i] = (np.concatenate([enc.input_ids, tail_ids]), np.concatenate([enc.labels, tail_labels]))
        for (i, _), enc in zip(full, encoder.encode_many([conv for _, conv in full]), strict=True):
            built[i] = enc if isinstance(enc, EncodeError) else (enc.input_ids, enc.labels)
        next_pending: list[Piece] = []
        for i, (p, item) in enumerate(zip(pending, built, strict=True)):
            if i in early:
                pieces[(p.conv, p.first)] = early[i]
            elif isinstance(item, EncodeError):
                res.dropped_examples[item.reason] += 1
                pieces[(p.conv, p.first)] = []
            elif len(item[0]) <= context:
                pieces[(p.conv, p.first)] = [item]
            elif p.stop - p.first > 1:
                res.overflow["replanned_pieces"] += 1
                next_pending.extend([Piece(p.conv, p.first, p.stop - 1), Piece(p.conv, p.stop - 1, p.stop)])
            else:
                pieces[(p.conv, p.first)] = _overflow(p, item, wholes[p.conv], context, policy, res)
        pending = next_pending
    for (ci, _first), exs in sorted(pieces.items()):
        res.examples.setdefault(ci, []).extend(exs)


def _cuts(encoder: ConversationEncoder, r: Rendered, special: int) -> list[int]:
    """Where a piece's opening may switch to the whole conversation's tokens, earliest first.

    Always at its first special token. Where the vocabulary proves a space after a non-space an
    exact cut (`word_cut`), also at the first such space inside the first pair ("USER:| q": only
    the header and role marker, text that recurs across pieces, are tokenized again), and where the
    first reply begins (" ASSISTANT:| reply": for templates that put the system prompt inside the
    first user turn).
    """
    cuts = []
    if encoder.word_cut:
        space = r.text.find(" ", int(r.pair_chars[0]) + 1, special)
        while space > 0 and r.text[space - 1] == " ":
            space = r.text.find(" ", space + 1, special)
        if space > 0:
            cuts.append(space)
        if len(r.bounds) and 0 < r.bounds[0] < special:
            s0 = int(r.bounds[0])
            if r.text[s0] == " " and r.text[s0 - 1] != " " and s0 not in cuts:
                cuts.append(s0)
    return [*cuts, special]


# The cut is a property of the layout, asked once per piece: kept for the few layouts of a preparation.
_opening = functools.lru_cache(maxsize=64)(opening)


def _encode_prefixes(encoder: ConversationEncoder, prefixes: list[Rendered]) -> list[Encoded | EncodeError]:
    """Each distinct prefix tokenized once: most are the same system prompt and role marker."""
    keys = [(r.text, r.bounds.tobytes()) for r in prefixes]
    unique = {k: r for k, r in zip(keys, prefixes, strict=True)}
    encoded = dict(zip(unique, encoder.encode_rendered(list(unique.values())), strict=True))
    return [encoded[k] for k in keys]


def _estimate(whole: Encoded, p: Piece) -> int:
    """A piece's length from the whole conversation's tokens: header (BOS, system) plus its pairs."""
    starts = whole.pair_starts
    end = int(starts[p.stop]) if p.stop < len(starts) else len(whole.input_ids)
    return int(starts[0]) + end - int(starts[p.first])


def _overflow(p: Piece, own: Example | None, whole: Encoded, context: int, policy: Overflow,
              res: SplitResult) -> list[Example]:
    """A lone pair longer than the context. `split` windows the whole conversation's token stream
    over the pair (earlier turns are the preceding text, no re-tokenizing); `truncate` and `drop`
    work on the pair rendered on its own."""
    if policy != Overflow.split:
        assert own is not None
        return overflow_examples(own[0], own[1], context, policy, res.overflow)
    starts = whole.pair_starts
    lo = int(starts[p.first])
    hi = int(starts[p.stop]) if p.stop < len(starts) else len(whole.input_ids)
    out = windows(whole.input_ids, whole.labels, lo, hi, context)
    res.overflow["split_pairs"] += 1
    res.overflow["overflow_windows"] += len(out)
    return out


def _stitch(encoder: ConversationEncoder, whole: Encoded, conv: Conversation, p: Piece,
            n_pairs: int) -> Example | tuple[Rendered, Example] | None:
    """A piece from the whole conversation's tokens where that is exact; None when it must be tokenized.

    A piece that starts at the first pair is a prefix of the conversation up to a special token:
    its tokens are the conversation's. A later piece shares the conversation's text from its first
    special token on; only the text before it (system prompt and first pair) needs tokenizing.
    Only the piece's opening (header and first pair) is rendered and compared with the whole's
    text: every later pair renders exactly as in the whole conversation, since `render_segments`
    writes a pair from its own turns and from whether it is the first pair, nothing else. When the
    conversation was rendered with a compiled layout, even the opening is known from the layout
    (`_opening`), and only a cut the layout cannot vouch for renders it. A marked encoding knows
    the token of every cut it needs (`Encoded.openings`): nothing is rendered or compared.
    """
    w, enc = whole.rendered, whole.encoding
    if not encoder.stitch or w is None:
        return None
    if isinstance(w, Marked):  # every boundary a piece needs is known in tokens
        stop_tok = int(whole.pair_starts[p.stop]) if p.stop < n_pairs else len(whole.input_ids)
        if p.first == 0:
            return whole.input_ids[:stop_tok], whole.labels[:stop_tok]
        assert whole.openings is not None
        tail_first = int(whole.openings[p.first])
        if w.marks.opening is not None:
            prefix = w.marks.opening.prefix
        else:  # the piece joins at its first reply: its opening up to there holds the user's message
            r = encoder.render_turns(conv.system, conv.turns[2 * p.first:2 * p.first + 2])
            if not len(r.bounds):
                return None
            prefix = Rendered(r.text[:int(r.bounds[0])], np.zeros(0, dtype=np.int64), r.pair_chars[:1])
        return prefix, (whole.input_ids[tail_first:stop_tok], whole.labels[tail_first:stop_tok])
    if enc is None:
        return None
    end = int(w.pair_chars[p.stop]) if p.stop < n_pairs else len(w.text)
    if end == 0 or w.text[end - 1] not in encoder.sentinel_chars:
        return None  # the piece does not end at a special token
    last = enc.char_to_token(end - 1)
    if last is None:
        return None
    stop_tok = last + 1
    if w.layout is not None:  # compiled: the opening is known without rendering it
        if p.first == 0:  # the piece's text is a prefix of the whole's, by construction
            return whole.input_ids[:stop_tok], whole.labels[:stop_tok]
        opening = _opening(w.layout, encoder.sentinel_chars, encoder.word_cut)
        if opening is not None:
            begin = int(w.pair_chars[p.first]) + opening.offset
            tail_first = enc.char_to_token(begin)
            if tail_first is not None and enc.token_to_chars(tail_first)[0] == begin:
                return opening.prefix, (whole.input_ids[tail_first:stop_tok], whole.labels[tail_first:stop_tok])
    try:
        r = encoder.render_turns(conv.system, conv.turns[2 * p.first:2 * p.first + 2])
    except EncodeError:
        return None
    first_end = int(w.pair_chars[p.first + 1]) if p.first + 1 < n_pairs else len(w.text)  # the opening's end
    if p.first == 0:
        if r.text != w.text[:first_end]:
            return None
        return whole.input_ids[:stop_tok], whole.labels[:stop_tok]
    special = min((i for i in (r.text.find(ch) for ch in encoder.sentinel_chars) if i >= 0), default=-1)
    if special <= 0:
        return None
    for cut in _cuts(encoder, r, special):
        # the same text after the cut ends both the piece's opening and the pair in the whole
        # (the first pair's role marker may differ from a later pair's before the cut)
        begin = first_end - (len(r.text) - cut)
        if begin < max(1, int(w.pair_chars[p.first])) or r.text[cut:] != w.text[begin:first_end]:
            continue
        tail_first = enc.char_to_token(begin)
        if tail_first is not None and enc.token_to_chars(tail_first)[0] == begin:
            break  # the conversation's own tokens break there too
    else:
        return None
    bounds = np.minimum(r.bounds, cut)
    keep = bounds.reshape(-1, 2)
    keep = keep[keep[:, 1] > keep[:, 0]].reshape(-1)
    prefix = Rendered(r.text[:cut], keep, r.pair_chars[:1])
    return prefix, (whole.input_ids[tail_first:stop_tok], whole.labels[tail_first:stop_tok])
