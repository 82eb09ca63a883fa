"""The run-dir format: what a job leaves in its run dir, and how every reader finds it again.

    RUN_DIR/resolved_config.yaml   the config with every interpolation resolved, plus the overrides
                                   (what the ranks, `vicuna-exp export` and the launcher read)
    RUN_DIR/summary.json           one `Summary`: the outcome, its exit code and what was trained
    RUN_DIR/checkpoints/step_*/    complete checkpoints (`vicuna_exp.checkpoint`)
    RUN_DIR/.workers/rank_<r>.json each rank's exit code and error, for the job that started it
    RUN_DIR/.workers/heartbeat_rank_<r>.json  each rank's step, phase and time (`vicuna_exp.heartbeat`)

Reports read only these files, so the format has one home: every writer of `summary.json` (the
recipe, the job's usage-error path, the launcher when a worker dies) goes through `Summary`, and
so writes the same keys.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vicuna_exp.checkpoint import CHECKPOINTS_DIR, TrainerState, complete_checkpoints, read_state
from vicuna_exp.config import typed_config
from vicuna_exp.tracking import write_json_atomic

RESOLVED_CONFIG = "resolved_config.yaml"
SUMMARY_FILE = "summary.json"
WORKER_STATUS_DIR = ".workers"  # one JSON per rank: exit code and error, written as the rank ends


class RunStatus(str, Enum):
    completed = "completed"
    failed = "failed"
    interrupted = "interrupted"  # stopped cleanly with a checkpoint; the same command resumes it


# --------------------------------------------------------------------------------------------
# The resolved config
# --------------------------------------------------------------------------------------------
def save_resolved_config(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> None:
    """What the ranks read: the config with every interpolation resolved, plus the overrides."""
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    payload = {"config": resolved, "overrides": overrides}
    (run_dir / RESOLVED_CONFIG).write_text(OmegaConf.to_yaml(OmegaConf.create(payload)))


def load_resolved_config(run_dir: Path) -> tuple[DictConfig, list[str]]:
    payload = OmegaConf.load(run_dir / RESOLVED_CONFIG)
    cfg = typed_config(payload.config)
    assert isinstance(cfg, DictConfig)
    return cfg, list(payload.overrides)


def saved_overrides(run_dir: Path) -> list[str]:
    """The overrides the job saved, or none when it saved nothing readable."""
    try:
        return list(OmegaConf.load(run_dir / RESOLVED_CONFIG).overrides)
    except (OSError, AttributeError):
        return []


# --------------------------------------------------------------------------------------------
# summary.json
# --------------------------------------------------------------------------------------------
@dataclass
class Summary:
    """The outcome of a run dir's latest attempt, as `summary.json` holds it (keys in this order)."""

    status: RunStatus
    exit_code: int
    error: str | None = None
    steps: int = 0  # optimizer steps completed, over all attempts
    total_steps: int | None = None  # planned; None when the job ended before planning
    final_loss: float | None = None
    final_eval_loss: float | None = None
    best_eval_loss: float | None = None
    tokens_seen: int = 0
    supervised_tokens_seen: int = 0
    wall_s: float | None = None
    overrides: list[str] = field(default_factory=list)
    config_hash: str = ""
    run_dir: str = ""
    derived: dict[str, Any] | None = None  # facts derived from the config (world size, batch, tokens per step)
    tflops_per_device: float | None = None
    mfu: float | None = None
    peak_mem_gb: float | None = None  # rank 0's peak since the first training step (reserved, on CUDA)
    hardware: dict[str, Any] | None = None  # the resolved hardware profile and where it came from
    data_stats: dict[str, Any] | None = None
    provenance: dict[str, Any] | None = None
    # Written only when they say something:
    resumed_from_step: int | None = None
    traceback: str | None = None
    worker_errors: dict[str, str] | None = None  # rank -> error, when a multi-process run failed
    rank0_error: str | None = None  # rank 0's own error, when another rank's was the root cause

    @classmethod
    def from_state(cls, state: TrainerState, **outcome: Any) -> Summary:
        """The progress fields from a trainer state; the outcome (status, error, ...) from the caller."""
        return cls(steps=state.step, final_loss=state.last_loss, final_eval_loss=state.last_eval_loss,
                   best_eval_loss=state.best_eval_loss, tokens_seen=state.tokens_seen,
                   supervised_tokens_seen=state.supervised_tokens_seen, **outcome)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["status"] = RunStatus(self.status).value
        for key in OPTIONAL_KEYS:
            if out[key] is None:
                del out[key]
        return out

    def write(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / SUMMARY_FILE, self.to_dict())

    @classmethod
    def read(cls, run_dir: Path) -> Summary | None:
        """The run dir's summary; None when there is none, or it is not one (cut off, hand-edited)."""
        try:
            raw = json.loads((run_dir / SUMMARY_FILE).read_text())
            known = {f.name for f in fields(cls)}
            summary = cls(**{k: v for k, v in raw.items() if k in known})
            summary.status = RunStatus(summary.status)
        except (OSError, ValueError, TypeError, AttributeError):
            return None
        return summary


SUMMARY_KEYS = tuple(f.name for f in fields(Summary))
OPTIONAL_KEYS = ("resumed_from_step", "traceback", "worker_errors", "rank0_error")


def completed_summary(run_dir: Path, cfg_hash: str) -> Summary | None:
    """The summary of a run dir that completed with this config (a rerun skips it), else None."""
    summary = Summary.read(run_dir)
    if summary is not None and summary.status == RunStatus.completed and summary.config_hash == cfg_hash:
        return summary
    return None


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
def latest_checkpoint(run_dir: Path) -> Path | None:
    """The run dir's newest complete checkpoint (None: none yet)."""
    done = complete_checkpoints(run_dir / CHECKPOINTS_DIR)
    return done[-1] if done else None


def latest_state(run_dir: Path) -> TrainerState | None:
    """The progress of the newest complete checkpoint: what can be said of a run without its ranks."""
    ckpt = latest_checkpoint(run_dir)
    return read_state(ckpt) if ckpt is not None else None
