"""Checks of where a run will write, before any work: exit 2 naming the path, not a failure hours later.

A read-only or missing output location, or a run dir without room for even one checkpoint, is
bad usage (nothing has started). Hydra writes `.hydra/` into the run dir before the job runs, so
the location is checked before Hydra is called (`check_output_location`) and the room in the run
dir once the config is known (`check_run_dir_room`). Nothing here imports torch: the CLI calls it
before every Hydra command that keeps a run dir.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from vicuna_exp.config import world_size
from vicuna_exp.diskspace import fmt_bytes, free_bytes
from vicuna_exp.errors import UsageError
from vicuna_exp.plan.estimate import predicted_state_bytes

log = logging.getLogger(__name__)
MIN_FREE_BYTES = 1 << 20  # `.hydra/`, resolved_config.yaml, metrics and summary of a short run


def check_output_location(path: Path, key: str) -> None:
    """The directory exists and is writable, or its nearest existing parent is (so it can be made)."""
    path = Path(path).absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{key}={path}: {existing} is not a directory; choose another location")
    if not os.access(existing, os.W_OK | os.X_OK):
        why = "is read-only" if _read_only_fs(existing) else "is not writable by this user"
        if existing != path:
            why = f"does not exist and cannot be created ({existing} {why})"
        raise UsageError(f"{key}={path}: {why}; choose a writable location")
    free = free_bytes(existing)
    if free is not None and free < MIN_FREE_BYTES:
        raise UsageError(f"{key}={path}: only {fmt_bytes(free)} free on its disk; free space or choose another location")


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def expected_checkpoint_bytes(cfg: Any) -> int | None:
    """One checkpoint over all ranks, from the planner: parameters and optimizer state (no gradients)."""
    try:
        state = predicted_state_bytes(cfg)
    except Exception as e:  # noqa: BLE001 - an estimate only; the first save then measures it
        log.debug("no checkpoint size estimate: %s", e)
        return None
    return int((state["params"] + state["optim"]) * world_size(cfg))


def check_run_dir_room(run_dir: Path, needed: int | None) -> None:
    """Clearly too small: not even one checkpoint of `needed` bytes (the newest existing one's size,
    else the planner's) fits."""
    check_output_location(run_dir, "hydra.run.dir")
    free = free_bytes(run_dir)
    if needed is not None and free is not None and free < needed:
        raise UsageError(f"hydra.run.dir={run_dir}: {fmt_bytes(free)} free, but one checkpoint needs about "
                         f"{fmt_bytes(needed)}; free space there or choose another run dir")
