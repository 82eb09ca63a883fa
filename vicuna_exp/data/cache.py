"""The shared cache of prepared datasets: content-hash keys, one builder at a time, atomic publish.

A preparation is keyed by a hash of everything that determines its rows (raw data bytes, cleaning
settings, template, tokenizer files, context, split policy, eval fraction, packing). Sweep jobs with
the same data settings share one entry: the first takes a file lock and builds into a private
temporary directory that is renamed into place only when complete; the others wait on the lock
and then open the finished entry. A crashed builder leaves only a temporary directory, and its
lock (an OS lock) dies with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vicuna_exp.errors import UsageError

CACHE_ENV = "VICUNA_EXP_CACHE"
COMPLETE_MARKER = "stats.json"  # written last inside the build directory
_file_hash_memo: dict[tuple[str, int, int], str] = {}


def cache_root(cache_dir: str | None) -> Path:
    """`data.cache_dir`, else $VICUNA_EXP_CACHE, else ~/.cache/vicuna-exp."""
    if cache_dir:
        root = Path(cache_dir).expanduser()
    elif os.environ.get(CACHE_ENV):
        root = Path(os.environ[CACHE_ENV]).expanduser()
    else:
        root = Path.home() / ".cache" / "vicuna-exp"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"data.cache_dir: cannot create the cache directory {root}: {exc.strerror}") from None
    return root


def file_hash(path: Path) -> str:
    """sha256 of a file's bytes, remembered per (path, size, mtime) in this process."""
    st = path.stat()
    memo_key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo_key in _file_hash_memo:
        return _file_hash_memo[memo_key]
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    _file_hash_memo[memo_key] = digest
    return digest


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt")


def tokenizer_hash(tokenizer: Any, tokenizer_dir: str | None) -> str:
    """The tokenizer's files when its directory is known, else its serialized pipeline."""
    h = hashlib.sha256()
    files = [Path(tokenizer_dir) / n for n in TOKENIZER_FILES] if tokenizer_dir else []
    files = [f for f in files if f.is_file()]
    if files:
        for f in files:
            h.update(f.name.encode() + b"\0" + file_hash(f).encode() + b"\0")
    else:
        h.update(tokenizer.backend_tokenizer.to_str().encode("utf-8"))
    h.update(json.dumps([tokenizer.bos_token, tokenizer.eos_token, getattr(tokenizer, "add_bos_token", None),
                         getattr(tokenizer, "add_eos_token", None)]).encode())
    return h.hexdigest()


def content_key(parts: dict[str, Any]) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file()


@contextmanager
def _lock(root: Path, key: str, on_wait: Callable[[], None] | None) -> Iterator[None]:
    from filelock import FileLock, Timeout

    lock_dir = root / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_dir / f"{key[:32]}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if on_wait is not None:
            on_wait()
        lock.acquire()  # wait for the other preparation as long as it takes
    try:
        yield
    finally:
        lock.release()


def get_or_build(
    root: Path,
    name: str,
    key: str,
    build: Callable[[Path], None],
    on_wait: Callable[[], None] | None = None,
) -> tuple[Path, bool]:
    """The entry for `key`, building it with `build(tmp_dir)` if absent. Returns (path, built_here)."""
    final = root / "prepared" / f"{name}-{key[:16]}"
    if is_complete(final):
        return final, False
    final.parent.mkdir(parents=True, exist_ok=True)
    with _lock(root, key, on_wait):
        if is_complete(final):  # another job finished it while we waited
            return final, False
        if final.exists():  # an incomplete entry can only come from outside this protocol: replace it
            shutil.rmtree(final)
        tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            build(tmp)
            if not is_complete(tmp):
                raise RuntimeError(f"preparation into {tmp} finished without {COMPLETE_MARKER}")
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final, True
