"""The shared cache of prepared datasets: content-hash keys, one builder at a time, atomic publish.

A preparation is keyed by a hash of everything that determines its rows (raw data bytes, cleaning
settings, template, tokenizer files, context, split policy, eval fraction, packing). Sweep jobs with
the same data settings share one entry: the first takes a file lock and builds into a private
temporary directory that is renamed into place only when complete; the others wait on the lock
and then open the finished entry. A crashed builder leaves only a temporary directory, and its
lock (an OS lock) dies with it.

Each entry records its files' sizes (`manifest.json`) when it is published, and `open` checks
them: an Arrow IPC stream cut short still reads, silently, up to its last complete batch. An
entry that fails its check is rebuilt with a warning naming the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vicuna_exp.data.sentencepiece_merges import converted_from_sentencepiece
from vicuna_exp.diskspace import writing
from vicuna_exp.errors import UsageError

log = logging.getLogger(__name__)
CACHE_ENV = "VICUNA_EXP_CACHE"
COMPLETE_MARKER = "stats.json"  # written last inside the build directory
MANIFEST = "manifest.json"  # {relative path: bytes} of every file, written at publish
_file_hash_memo: dict[tuple[str, int, int], str] = {}


class CorruptEntry(Exception):
    """An entry whose files are not what was written; the message names the file."""


class StaleEntry(CorruptEntry):
    """A sound entry written before it recorded something a run now needs: rebuilt, as a corrupt one is."""


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
        if converted_from_sentencepiece(Path(tokenizer_dir)):  # the same files give other ids since the fix
            h.update(b"sentencepiece merge order\0")
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


def write_manifest(entry: Path) -> None:
    sizes = {}
    for root, _, files in os.walk(entry):
        for name in files:
            f = Path(root) / name
            sizes[f.relative_to(entry).as_posix()] = f.stat().st_size
    (entry / MANIFEST).write_text(json.dumps(sizes, indent=0, sort_keys=True))


def check_manifest(entry: Path) -> None:
    """Raise CorruptEntry naming the first file whose size differs from when it was written (a few
    `stat`s; an entry from before manifests were written has none and is taken as it is)."""
    try:
        sizes = json.loads((entry / MANIFEST).read_text())
    except FileNotFoundError:
        return
    except (OSError, json.JSONDecodeError) as e:
        raise CorruptEntry(f"{entry / MANIFEST}: unreadable ({e})") from None
    for rel, size in sizes.items():
        try:
            actual = os.stat(entry / rel).st_size
        except OSError:
            raise CorruptEntry(f"{entry / rel}: missing (written with {size} bytes)") from None
        if actual != size:
            raise CorruptEntry(f"{entry / rel}: {actual} bytes, but {size} when written (truncated or changed)")


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
    open_entry: Callable[[Path], Any] = check_manifest,
) -> tuple[Any, bool]:
    """`open_entry(path)` of the entry for `key`, building it with `build(tmp_dir)` if absent or if
    `open_entry` finds it corrupt (raises CorruptEntry). Returns (what open_entry returned, built_here)."""
    final = root / "prepared" / f"{name}-{key[:16]}"
    opened = _open_if_sound(final, open_entry)
    if opened is not None:
        return opened, False
    final.parent.mkdir(parents=True, exist_ok=True)
    with _lock(root, key, on_wait):
        opened = _open_if_sound(final, open_entry, quiet=True)
        if opened is not None:  # another job finished (or repaired) it while we waited
            return opened, False
        if final.exists():  # incomplete or corrupt: replaced
            shutil.rmtree(final)
        tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            with writing("the prepared dataset", root, partial=tmp):
                build(tmp)
                if not is_complete(tmp):
                    raise RuntimeError(f"preparation into {tmp} finished without {COMPLETE_MARKER}")
                write_manifest(tmp)
                os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return open_entry(final), True


def _open_if_sound(entry: Path, open_entry: Callable[[Path], Any], quiet: bool = False) -> Any:
    if not is_complete(entry):
        return None
    try:
        return open_entry(entry)
    except CorruptEntry as e:
        if not quiet:
            log.warning("prepared cache entry is %s: %s; rebuilding it",
                        "out of date" if isinstance(e, StaleEntry) else "corrupt", e)
        return None
