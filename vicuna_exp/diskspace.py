"""A full disk or an exceeded quota, wherever the run writes, said in one line.

Writers fail in many voices when the disk fills: `OSError(ENOSPC)`, `OSError(EDQUOT)`, torch's
zip writer (`[enforce fail at inline_container.cc] . unexpected pos ...`), safetensors' Rust
`os error 28`. `writing(what, where)` turns each of them into one `DiskFull` naming what was
being written, where, how much it needed and how much was free, so the run can end with that
line (exit 75 when a complete checkpoint exists to resume from, else 1) instead of a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import os
import shutil
import traceback
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# What writers that do not raise OSError say when the disk fills; torch's zip writer only knows
# that the file position did not advance ("unexpected pos"), which a short write causes.
_FULL_WORDS = ("no space left", "disk quota exceeded", "os error 28", "os error 122", "unexpected pos",
               "file write failed", "pytorchstreamwriter failed writing")


class DiskFull(OSError):
    """A write failed because the disk (or the quota) is full; the message is the one line to show."""

    PREFIX = "disk full while writing"

    def __init__(self, what: str, where: Path, needed: int | None, free: int | None) -> None:
        self.what, self.where, self.needed, self.free = what, Path(where), needed, free
        need = f"needed {fmt_bytes(needed)}" if needed else "needed more"
        have = f"{fmt_bytes(free)} free" if free is not None else "free space unknown"
        self.line = f"{self.PREFIX} {what} to {where}: {need}, {have}; free space there and rerun the same command"
        super().__init__(errno.ENOSPC, self.line)

    def __str__(self) -> str:
        return self.line

    @classmethod
    def said(cls, error: str | None) -> bool:
        """Whether a recorded error (a worker's status) was a full disk."""
        return bool(error) and error.startswith(cls.PREFIX)


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def is_disk_full(exc: BaseException) -> bool:
    """Whether this exception, or one it was raised from, is a full disk or quota."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, DiskFull):
            return True
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return True
        if any(w in str(e).lower() for w in _FULL_WORDS):
            return True
        e = e.__cause__ or e.__context__
    return False


def free_bytes(path: Path) -> int | None:
    """Free bytes for an unprivileged writer on the filesystem holding `path` (or its nearest parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def tree_bytes(path: Path) -> int:
    """Bytes of the files under `path` (0 when it does not exist)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


@contextlib.contextmanager
def writing(what: str, where: Path, needed: int | None = None, *, partial: Path | None = None) -> Iterator[None]:
    """Turn a full disk inside the block into `DiskFull`; `partial` (a file or dir) is removed first,
    so a cut-off write never holds the space it took."""
    try:
        yield
    except DiskFull:
        raise
    except BaseException as e:  # torch.distributed.checkpoint's CheckpointException is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit)) or not is_disk_full(e):
            raise
        if needed is None and partial is not None:
            needed = tree_bytes(partial) or None  # at least what it had written when the disk filled
        release_files(e)
        if partial is not None:
            remove(partial)
        raise DiskFull(what, where, needed, free_bytes(where)) from e


def release_files(exc: BaseException) -> None:
    """Close the files a failed writer still holds: they live on in the finished frames of the
    exception's traceback (DeepSpeed's checkpoint writers, for one), and a removed file's space is
    freed only when its last descriptor closes. Otherwise the status and the summary written next
    find the disk as full as before."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if e.__traceback__ is not None:
            traceback.clear_frames(e.__traceback__)  # frames still running (ours, the caller's) are kept
        e = e.__cause__ or e.__context__
    gc.collect()


def remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if Path(path).is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            Path(path).unlink()


def warn_if_short(what: str, where: Path, needed: int | None) -> bool:
    """Before a large write: a warning while there is still time to free space. True when it fits."""
    free = free_bytes(where)
    if needed is None or free is None or needed <= free:
        return True
    log.warning("%s needs about %s in %s, but only %s is free: it will fail unless space is freed",
                what, fmt_bytes(needed), where, fmt_bytes(free))
    return False
