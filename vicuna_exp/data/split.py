"""Turn-aligned splitting: conversations longer than the context become several whole-pair examples.

Pieces are planned from the whole conversation's pair starts. Each piece then gets exactly the ids
of its own rendering, its header and then its pairs (`ConversationEncoder.encode_pieces`), and one
that still does not fit gives up its last pair to a piece of its own. A lone pair longer than the
context follows `data.overflow`: `split` (windows over the conversation's token stream: the reply
continues in further windows, each preceded by as much earlier text as fits, unsupervised),
`truncate` (the pair on its own, cut at the context: the Alpaca-style arm) or `drop`.
"""

from __future__ import annotations

import itertools
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from vicuna_exp.choices import Overflow
from vicuna_exp.data.encode import IGNORE, Encoded, EncodeError

if TYPE_CHECKING:
    from vicuna_exp.data.clean import Conversation
    from vicuna_exp.data.encode import ConversationEncoder

ENCODE_CHUNK = 256  # conversations per batched tokenizer call (small: keeps the pipeline overlapped)
FIRST_CHUNK = 32  # the first call's size, doubling up to ENCODE_CHUNK: the tokenizer starts at once
IN_FLIGHT = 3  # batches queued on the tokenizer while this thread labels one
TOKENIZE_WORKERS = 2  # batched tokenizer calls running at once (each uses every core)
MIN_CONTEXT_FRACTION = 4  # a continuation window starts with at least context // 4 tokens of earlier text
Example = tuple[np.ndarray, np.ndarray]  # (input_ids, labels)
Piece = tuple[int, int, int]  # (conversation index, first pair, one past the last pair)


def plan_pieces(conv: int, enc: Encoded, n_pairs: int, context: int) -> list[Piece]:
    """Greedy runs of whole pairs whose estimated length (header + pairs) fits the context."""
    starts = [*enc.pair_starts.tolist(), len(enc.input_ids)]
    pieces: list[Piece] = []
    i = 0
    while i < n_pairs:
        length, j = starts[0] + starts[i + 1] - starts[i], i + 1
        while j < n_pairs and length + starts[j + 1] - starts[j] <= context:
            length, j = length + starts[j + 1] - starts[j], j + 1
        pieces.append((conv, i, j))
        i = j
    return pieces


def windows(ids: np.ndarray, labels: np.ndarray, lo: int, hi: int, context: int) -> list[Example]:
    """Examples that together supervise every token of `ids[lo:hi]` once (`overflow=split`).

    Each window is BOS followed by a stretch of the token stream: new tokens (labels kept) preceded
    by as much earlier text as fits (labels -100), at least a quarter of the context after the
    first window. Windows with nothing supervised are left out.
    """
    step = max(1, context - 1 - max(1, context // MIN_CONTEXT_FRACTION))  # new tokens per window
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


def overflow_examples(ids: np.ndarray, labels: np.ndarray, context: int, policy: Overflow, counts: Counter,
                      stream: tuple[np.ndarray, np.ndarray, int, int] | None = None) -> list[Example]:
    """Examples for one pair, rendered on its own, that does not fit the context (counted in
    `counts`); `split` windows `stream` (ids, labels, lo, hi: the whole conversation's tokens and
    the pair's place in them) when given, else the pair's own tokens."""
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
    out = windows(*(stream or (ids, labels, 1, len(ids))), context)
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

    Pipelined: the tokenizer (Rust, all cores, no GIL) works on the next chunks in background threads,
    two batches at a time, while this thread reads, cleans (when `convs` is a lazy stream), renders
    and labels. `on_chunk(result, start, stop)` is called once conversations `start:stop` have their
    examples (it may take them out of `examples`), so whatever the caller does overlaps too."""
    from concurrent.futures import ThreadPoolExecutor

    chunks = _chunks(iter(convs))
    res = SplitResult()
    source: list[int] = []
    alive: list[bool] = []
    with ThreadPoolExecutor(max_workers=TOKENIZE_WORKERS) as pool:
        def submit():  # noqa: ANN202 - the next chunk, rendered and queued on the tokenizer (None at the end)
            chunk = next(chunks, None)
            if chunk is None:
                return None
            start = len(res.convs)
            res.convs.extend(chunk)
            source.extend([0] * len(chunk))
            alive.extend([True] * len(chunk))
            items = encoder.render_many((c.system, c.turns) for c in chunk)
            ok = [r for r in items if not isinstance(r, EncodeError)]
            return start, items, ok, pool.submit(encoder.tokenize, ok)

        ahead = deque(filter(None, (submit() for _ in range(IN_FLIGHT + 1))))  # this chunk and IN_FLIGHT more
        while ahead:
            start, items, ok, future = ahead.popleft()
            labelled = iter(encoder.label(ok, future.result()))
            encoded = [r if isinstance(r, EncodeError) else next(labelled) for r in items]
            _split_chunk(start, encoded, res.convs, encoder, context, overflow_policy, res, source, alive)
            if on_chunk is not None:
                on_chunk(res, start, start + len(items))
            ahead.extend(filter(None, [submit()]))
    res.source_tokens = np.asarray(source, dtype=np.int64)
    res.alive = np.asarray(alive, dtype=bool)
    return res


def _chunks(stream: Iterator[Conversation]) -> Iterator[list[Conversation]]:
    """Batches for the tokenizer: small at first, so it starts at once, then ENCODE_CHUNK; and small
    again at the very end (halving), so that little is left to label once the tokenizer is done.
    The stream is read one batch ahead, to see its end coming."""
    buffer: deque = deque()
    size, ended = FIRST_CHUNK, False
    while True:
        if not ended:
            buffer.extend(itertools.islice(stream, 2 * size - len(buffer)))
            ended = len(buffer) < 2 * size
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
    for ci, enc in enumerate(encoded, start):
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
    pieces: dict[tuple[int, int], list[Example]] = {}
    while pending:  # each piece gets the ids of its own rendering; one that does not fit gives up its last pair
        built = encoder.encode_pieces([(wholes[ci], convs[ci].system, convs[ci].turns, first, stop)
                                       for ci, first, stop in pending])
        next_pending: list[Piece] = []
        for (ci, first, stop), item in zip(pending, built, strict=True):
            if isinstance(item, EncodeError):
                res.dropped_examples[item.reason] += 1
                pieces[(ci, first)] = []
            elif len(item[0]) <= context:
                pieces[(ci, first)] = [item]
            elif stop - first > 1:
                res.overflow["replanned_pieces"] += 1
                next_pending += [(ci, first, stop - 1), (ci, stop - 1, stop)]
            else:  # `split` windows the whole conversation's tokens: earlier turns are the preceding text
                w = wholes[ci]
                hi = int(w.pair_starts[stop]) if stop < len(w.pair_starts) else len(w.input_ids)
                pieces[(ci, first)] = overflow_examples(*item, context, policy, res.overflow,
                                                        (w.input_ids, w.labels, int(w.pair_starts[first]), hi))
        pending = next_pending
    for (ci, _first), exs in sorted(pieces.items()):
        res.examples.setdefault(ci, []).extend(exs)
    for ci in range(start, start + len(encoded)):
        if alive[ci] and not res.examples.get(ci):
            alive[ci] = False
            res.dropped["overflow"] += 1  # every pair was longer than the context (overflow=drop)
