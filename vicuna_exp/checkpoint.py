"""Checkpoint directories: written under a temporary name and renamed once complete, so a
checkpoint cut off mid-write is never loaded; the newest `keep_last` are kept.

Layout: `checkpoints/step_00000120/` holding the backend's state (model, optimizer, schedule;
sharded where the backend shards: `state/` for torch.distributed.checkpoint, `deepspeed/` for
DeepSpeed), `rng/rank_<r>.pt` and `trainer_state.json` (written last: its presence marks a
complete checkpoint). Checkpoints of another configuration found in a run dir are moved aside to
`checkpoints.config-<hash>/`, never resumed.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vicuna_exp import distributed as D
from vicuna_exp.choices import ResumeMode
from vicuna_exp.diskspace import tree_bytes, warn_if_short, writing
from vicuna_exp.errors import UsageError
from vicuna_exp.tracking import write_json_atomic

log = logging.getLogger(__name__)
CHECKPOINTS_DIR = "checkpoints"  # inside a run dir
STATE_FILE = "trainer_state.json"
STEP_PREFIX = "step_"
DCP_SUBDIR = "state"  # torch.distributed.checkpoint layout of single / ddp / fsdp backends
DEEPSPEED_SUBDIR = "deepspeed"  # DeepSpeed's own layout (engine.save_checkpoint tag)


@dataclass
class TrainerState:
    """What the loop needs besides the backend's tensors to continue exactly where it stopped."""

    step: int = 0  # optimizer steps completed
    tokens_seen: int = 0
    supervised_tokens_seen: int = 0
    wall_s: float = 0.0  # over all attempts
    best_eval_loss: float | None = None
    last_eval_loss: float | None = None
    last_loss: float | None = None
    world_size: int = 1
    backend: str = "single"
    config_hash: str = ""
    finetune: str = "full"  # the method that trained (finetune.name): a checkpoint resumes only its own
    model_flops: float = 0.0  # summed over training steps (evaluation excluded): the MFU numerator
    train_s: float = 0.0  # time inside training steps, over all attempts: the MFU denominator
    peak_mem_gb: float = 0.0  # this rank's largest peak_mem_gb of any training step, over all attempts

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> TrainerState:
        """A saved state; checkpoints written before the MFU fields kept them in an `extra` dict."""
        saved = dict(saved)
        legacy = saved.pop("extra", None) or {}
        saved.setdefault("model_flops", legacy.get("model_flops", 0.0))
        saved.setdefault("train_s", legacy.get("step_s", 0.0))
        return cls(**saved)


def read_state(ckpt: Path) -> TrainerState:
    return TrainerState.from_dict(json.loads((ckpt / STATE_FILE).read_text()))


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first. Temporary (`.tmp-*`) dirs are never listed."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)]
    return sorted((p for p in dirs if (p / STATE_FILE).is_file()), key=lambda p: p.name)


def one_checkpoint_bytes(root: Path, expected: int | None) -> int | None:
    """Bytes of the newest complete checkpoint under `root`; `expected` (an estimate) before the first."""
    done = complete_checkpoints(root)
    return tree_bytes(done[-1]) if done else expected


def capture_rng() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


class CheckpointManager:
    def __init__(self, root: Path, *, keep_last: int, dist: D.DistInfo, expected_bytes: int | None = None) -> None:
        self.root = root
        self.keep_last = keep_last
        self.dist = dist
        self.expected_bytes = expected_bytes  # a checkpoint's size before the first one exists (the planner's)

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first. Temporary (`.tmp-*`) dirs are never listed."""
        return complete_checkpoints(self.root)

    def save(self, state: TrainerState, save_backend: Callable[[Path], None]) -> Path:
        """Every rank calls this; rank 0 owns the directory's life cycle."""
        final = self.root / step_dir_name(state.step)
        tmp = self.root / f".tmp-{final.name}"
        needed = self.size_of_one()
        if self.dist.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            warn_if_short(f"checkpoint {final.name}", self.root, needed)
        # A full disk removes the partial checkpoint (the previous complete one is untouched).
        with writing(f"checkpoint {final.name}", self.root, needed, partial=tmp):
            if self.dist.is_main:
                (tmp / "rng").mkdir(parents=True)
            D.barrier()
            save_backend(tmp)
            torch.save(capture_rng(), tmp / "rng" / f"rank_{self.dist.rank}.pt")
            D.barrier()
            if self.dist.is_main:
                write_json_atomic(tmp / STATE_FILE, asdict(state))
                if final.exists():  # a re-save of the same step (e.g. interrupted right after a periodic save)
                    shutil.rmtree(final)
                tmp.rename(final)
                self._prune()
        D.barrier()
        return final

    def size_of_one(self) -> int | None:
        """Bytes of the newest complete checkpoint, else the planner's estimate."""
        return one_checkpoint_bytes(self.root, self.expected_bytes)

    def _prune(self) -> None:
        for old in self.complete()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def load_latest(self, load_backend: Callable[[Path], None], *, candidates: list[Path] | None = None
                    ) -> TrainerState | None:
        """Newest checkpoint that loads; a corrupt one is skipped with a warning naming it."""
        for ckpt in reversed(candidates if candidates is not None else self.complete()):
            try:
                state = read_state(ckpt)
                load_backend(ckpt)
                rng_file = ckpt / "rng" / f"rank_{self.dist.rank}.pt"
                if rng_file.exists():
                    restore_rng(torch.load(rng_file, weights_only=False))
                return state
            except Exception as e:  # noqa: BLE001 - any failure means: fall back to an older one
                log.warning("checkpoint %s cannot be loaded (%s: %s); trying the previous one",
                            ckpt, type(e).__name__, e)
        return None

    def resume(self, resume: str, load_backend: Callable[[Path], None], *, config_hash: str,
               finetune: str = "full") -> TrainerState | None:
        """`trainer.resume`: never; auto (the newest loadable checkpoint here, after setting aside those
        of another configuration); or a PATH (a checkpoint, or a dir of them, e.g. another run's)."""
        if resume == ResumeMode.never:
            return None
        if resume == ResumeMode.auto:
            self.set_aside_foreign(config_hash, finetune)
            state = self.load_latest(load_backend)
        else:
            path = Path(resume)
            if not path.is_dir():
                raise UsageError(f"trainer.resume={resume}: no such checkpoint directory")
            state = self.load_latest(load_backend, candidates=complete_checkpoints(path) or [path])
            if state is None:
                raise UsageError(f"trainer.resume={resume}: no loadable checkpoint there")
        if state is not None:
            log.info("resumed from step %d (%s)", state.step, self.root)
        return state

    def set_aside_foreign(self, config_hash: str, finetune: str = "full") -> None:
        """Checkpoints of another configuration in this run dir are moved aside, not resumed:
        a job whose configuration changed trains again from the start."""
        done = self.complete()
        if not done:
            return
        saved = json.loads((done[-1] / STATE_FILE).read_text())
        theirs = saved.get("config_hash")
        if theirs and theirs != config_hash:
            method = saved.get("finetune", "full")
            why = (f"; they were trained with finetune={method}, this run is finetune={finetune}, and one "
                   f"method's checkpoint does not hold the other's state" if method != finetune else "")
            if self.dist.is_main:
                aside = self.root.with_name(f"{self.root.name}.config-{theirs}")
                log.warning("checkpoints in %s are of another configuration (%s, now %s%s): moved to %s; "
                            "training from the start", self.root, theirs, config_hash, why, aside)
                self.root.rename(aside)
            D.barrier()
