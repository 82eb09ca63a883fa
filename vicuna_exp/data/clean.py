"""Clean raw ShareGPT records into alternating (user, assistant) conversations.

Each step is a `data.*` switch; a record that does not survive is counted under one reason in
`stats.json` (`dropped`), and changes that keep the record are counted under `cleaning`. Records
are independent, so `clean_records` can fan them out over worker processes.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from vicuna_exp.choices import NonAlternating, SystemPolicy
from vicuna_exp.data.config import DataConfig
from vicuna_exp.data.template import ASSISTANT, SYSTEM, USER
from vicuna_exp.errors import UsageError

# Drop reasons, in the order the steps run (stats.json lists them all, zeros included).
DROP_REASONS = (
    "malformed", "unknown_role", "bad_edges", "non_alternating", "too_few_pairs",
    "blocked_words", "language", "duplicate", "private_use_char", "misaligned", "overflow",
)


@dataclass
class Conversation:
    id: str
    system: str | None  # None: the template's default system prompt
    turns: list[tuple[str, str]]  # alternating (user, assistant), starting with the user

    def key(self) -> tuple:
        """Content identity for exact deduplication (the id is not part of it): the strings
        themselves, so two conversations are duplicates exactly when they are equal."""
        return self.system, tuple(self.turns)


@dataclass
class CleanResult:
    conversations: list[Conversation]
    input_records: int
    dropped: Counter = field(default_factory=Counter)
    changes: Counter = field(default_factory=Counter)  # edits that kept the record


def check_config(cfg: DataConfig) -> None:
    """Ranges, and what the chosen filters need installed (the schema's Enums check the choices)."""
    if not 0.0 <= cfg.eval_fraction < 1.0:
        raise UsageError(f"data.eval_fraction: must be in [0, 1), got {cfg.eval_fraction}")
    if cfg.min_pairs < 1:
        raise UsageError(f"data.min_pairs: must be >= 1, got {cfg.min_pairs}")
    if cfg.languages is not None:
        try:
            import langdetect  # noqa: F401
        except ImportError:
            raise UsageError("data.languages: the offline language filter needs the 'langdetect' package "
                             "(pip install langdetect==1.0.9)") from None


class _Cleaner:
    """The per-record steps, configured once."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.roles = {r.lower(): USER for r in cfg.user_roles}
        self.roles.update({r.lower(): ASSISTANT for r in cfg.assistant_roles})
        self.roles.update({r.lower(): SYSTEM for r in cfg.system_roles})
        self.blocked = [w.lower() for w in cfg.blocked_words if w]
        self.languages = set(cfg.languages) if cfg.languages is not None else None

    def __call__(self, index: int, record: Any, changes: Counter) -> Conversation | str:
        """A clean conversation, or the reason the record is dropped."""
        cfg = self.cfg
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
            return "malformed"
        rid = record.get("id")
        if rid is not None and not isinstance(rid, (str, int)):
            return "malformed"
        messages: list[tuple[str, str]] = []
        for turn in record["conversations"]:
            if not isinstance(turn, dict):
                return "malformed"
            raw_role = turn.get("from", turn.get("role"))
            value = turn.get("value", turn.get("content"))
            if not isinstance(raw_role, str) or not isinstance(value, str):
                return "malformed"
            role = self.roles.get(raw_role.lower())
            if role is None:
                return "unknown_role"
            messages.append((role, value))
        if cfg.html_to_markdown:
            from vicuna_exp.data.html import html_to_markdown, looks_like_html

            converted = []
            for role, value in messages:
                if role == ASSISTANT:
                    new = html_to_markdown(value)
                    if looks_like_html(value):
                        changes["html_converted_messages"] += 1
                    value = new
                converted.append((role, value))
            messages = converted
        if cfg.strip_whitespace:
            messages = [(r, v.strip()) for r, v in messages]
        if cfg.drop_empty_messages:
            kept = [(r, v) for r, v in messages if v.strip()]
            changes["empty_messages_removed"] += len(messages) - len(kept)
            messages = kept
        # system messages: a leading one fills the template's system slot (policy "template")
        system: str | None = None
        if messages and messages[0][0] == SYSTEM and cfg.system_policy == SystemPolicy.template:
            system = messages[0][1]
            messages = messages[1:]
            changes["system_prompts_used"] += 1
        n_sys = sum(1 for r, _ in messages if r == SYSTEM)
        if n_sys:
            changes["system_messages_dropped"] += n_sys
            messages = [(r, v) for r, v in messages if r != SYSTEM]
        # edges: the first turn must be the user's, the last the assistant's
        lead = 0
        while lead < len(messages) and messages[lead][0] != USER:
            lead += 1
        tail = len(messages)
        while tail > lead and messages[tail - 1][0] != ASSISTANT:
            tail -= 1
        if lead or tail < len(messages):
            if not cfg.trim_edges:
                return "bad_edges"
            changes["edge_turns_trimmed"] += lead + len(messages) - tail
            messages = messages[lead:tail]
        # consecutive turns of one role
        turns: list[tuple[str, str]] = []
        for role, value in messages:
            if turns and turns[-1][0] == role:
                if cfg.non_alternating == NonAlternating.drop:
                    return "non_alternating"
                turns[-1] = (role, turns[-1][1] + "\n\n" + value)
                changes["turns_merged"] += 1
            else:
                turns.append((role, value))
        if len(turns) // 2 < cfg.min_pairs:
            return "too_few_pairs"
        if self.blocked:
            lowered = [v.lower() for _, v in turns]
            if any(w in v for v in lowered for w in self.blocked):
                return "blocked_words"
        if self.languages is not None and _language(turns) not in self.languages:
            return "language"
        conv_id = str(rid) if rid is not None else f"record-{index}"
        return Conversation(conv_id, system, turns)


def _language(turns: Sequence[tuple[str, str]]) -> str:
    """The language of the user's text, offline (langdetect, seeded so it is deterministic)."""
    from langdetect import DetectorFactory, detect
    from langdetect.lang_detect_exception import LangDetectException

    DetectorFactory.seed = 0
    text = " ".join(v for r, v in turns if r == USER)[:2000]
    try:
        return detect(text)
    except LangDetectException:
        return "unknown"


def _clean_chunk(args: tuple[DataConfig, int, list[Any]]) -> tuple[list[Conversation | str], Counter]:
    cfg, offset, records = args
    cleaner = _Cleaner(cfg)
    changes: Counter = Counter()
    return [cleaner(offset + i, r, changes) for i, r in enumerate(records)], changes


def clean_stream(records: Iterable[Any], cfg: DataConfig, result: CleanResult, num_proc: int = 1
                 ) -> Iterator[Conversation]:
    """Clean records as they stream in, dropping exact duplicates of earlier ones.

    Counts go into `result` as the stream is consumed (`conversations` is left to the caller).
    """
    check_config(cfg)
    seen: set[tuple] = set()

    def outcomes() -> Iterator[tuple[list[Conversation | str], Counter | None]]:
        if num_proc > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            materialised = list(records)
            chunk = max(1, -(-len(materialised) // (num_proc * 4)))
            jobs = [(cfg, s, materialised[s:s + chunk]) for s in range(0, len(materialised), chunk)]
            # spawn: the parent may hold a tokenizer thread pool, which a fork would copy in a bad state
            with ProcessPoolExecutor(max_workers=num_proc, mp_context=mp.get_context("spawn")) as pool:
                yield from pool.map(_clean_chunk, jobs)
        else:
            cleaner = _Cleaner(cfg)
            for i, record in enumerate(records):
                yield [cleaner(i, record, result.changes)], None

    for items, changes in outcomes():
        if changes:
            result.changes.update(changes)
        for item in items:
            result.input_records += 1
            if isinstance(item, str):
                result.dropped[item] += 1
                continue
            if cfg.dedup:
                k = item.key()
                if k in seen:
                    result.dropped["duplicate"] += 1
                    continue
                seen.add(k)
            yield item


def clean_records(records: Sequence[Any], cfg: DataConfig, num_proc: int = 1) -> CleanResult:
    """Clean every record, deduplicate exact copies; keeps the input order."""
    result = CleanResult([], 0)
    result.conversations = list(clean_stream(records, cfg, result, num_proc))
    return result


def in_eval_split(conv_id: str, seed: int, fraction: float) -> bool:
    """Seeded hash of the conversation id: the same conversations at every context and sweep arm."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}:{conv_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction
