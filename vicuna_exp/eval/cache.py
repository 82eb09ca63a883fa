"""A local cache of judge replies, so a rerun (or a run that crashed halfway) pays nothing twice.

Keyed by judge model + prompt name + the exact messages and sampling settings: editing a
prompt, changing an answer or switching judges misses the cache, anything else hits it.
Stored as append-only JSONL, one reply per line, written as soon as the reply arrives,
under a file lock so several judging processes may share one cache file.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any

from vicuna_exp.eval.jsonl import append_jsonl, read_jsonl


def cache_key(judge_model: str, prompt_name: str, messages: list[dict[str, str]], **sampling: Any) -> str:
    blob = json.dumps(
        {"judge": judge_model, "prompt": prompt_name, "messages": messages, "sampling": sampling},
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class JudgmentCache:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._replies: dict[str, str] = {}
        self.hits = 0
        self.misses = 0
        if self.path.is_file():
            for _, rec in read_jsonl(self.path, lenient=True):
                if isinstance(rec.get("key"), str) and isinstance(rec.get("reply"), str):
                    self._replies[rec["key"]] = rec["reply"]

    def __len__(self) -> int:
        return len(self._replies)

    def get(self, key: str) -> str | None:
        with self._lock:
            reply = self._replies.get(key)
            if reply is None:
                self.misses += 1
            else:
                self.hits += 1
            return reply

    def put(self, key: str, reply: str, *, judge_model: str, prompt_name: str) -> None:
        from filelock import FileLock

        rec = {"key": key, "judge": judge_model, "prompt": prompt_name, "reply": reply, "tstamp": time.time()}
        with self._lock:
            self._replies[key] = reply
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(self.path) + ".lock"):
                append_jsonl(self.path, [rec])
