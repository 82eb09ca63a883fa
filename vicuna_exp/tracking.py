"""Where metrics go: `metrics.jsonl` (plain names, read by scripts and reports), Weights & Biases
(namespaced keys, rank 0 only) and a console progress bar. The only module that calls wandb.

wandb is online only when an API key is configured; otherwise offline, so a run never hangs on
a login prompt, and no key is ever written anywhere by this project.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf

from vicuna_exp.choices import LoggerMode, LoggerName

# metrics.jsonl name -> wandb key
_WANDB_KEYS = {"eval_loss": "eval/loss", "epoch": "train/epoch", "step": "train/step"}


def wandb_key_configured(env: dict[str, str] | None = None) -> bool:
    """An API key in the environment or in ~/.netrc (where `wandb login` puts it)."""
    env = dict(os.environ) if env is None else env
    if env.get("WANDB_API_KEY"):
        return True
    host = urlparse(env.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    netrc_path = Path(env.get("NETRC", Path.home() / ".netrc"))
    try:
        return netrc.netrc(str(netrc_path)).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(requested: str, env: dict[str, str] | None = None) -> str:
    env = dict(os.environ) if env is None else env
    if requested != LoggerMode.auto:
        return str(requested)
    if env.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return env["WANDB_MODE"]
    return "online" if wandb_key_configured(env) else "offline"


def run_name(overrides: list[str]) -> str:
    """Readable and stable: the overrides that define the run, or `default`."""
    keep = [o for o in overrides if not o.startswith(("hydra.", "logger.", "trainer.resume"))]
    return ",".join(keep)[:128] or "default"


def _finite(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


class Tracker:
    """Rank 0 writes; other ranks get a tracker whose methods do nothing."""

    def __init__(self, cfg: DictConfig, run_dir: Path, *, enabled: bool, overrides: list[str],
                 extra_config: dict[str, Any] | None = None, total_steps: int = 0, start_step: int = 0) -> None:
        self.enabled = enabled
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self._wandb = None
        self._bar = None
        if not enabled:
            return
        self._truncate_after(start_step)
        self._file = self.metrics_path.open("a", buffering=1)
        if cfg.logger.name == LoggerName.wandb:
            self._wandb = self._init_wandb(cfg, run_dir, overrides, extra_config or {})
        self._bar = self._make_bar(total_steps, start_step)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines the interrupted attempt logged after its last checkpoint."""
        if not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut off by a kill
        self.metrics_path.write_text("".join(f"{line}\n" for line in kept))

    def _init_wandb(self, cfg: DictConfig, run_dir: Path, overrides: list[str], extra: dict[str, Any]) -> Any:
        mode = resolve_wandb_mode(cfg.logger.mode)
        if mode == "disabled":
            return None
        import wandb

        config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        assert isinstance(config, dict)
        config["derived"] = extra
        tags = list(cfg.logger.tags) + [f"model={cfg.model.name}", f"context={cfg.context.length}",
                                        f"backend={cfg.backend.name}"]
        # The run id is stable per run dir, so a resumed run continues the same wandb run.
        run_id_file = run_dir / ".wandb_run_id"
        run_id = run_id_file.read_text().strip() if run_id_file.exists() else uuid.uuid4().hex[:8]
        run_id_file.write_text(run_id)
        return wandb.init(
            project=cfg.logger.project, entity=cfg.logger.entity, group=cfg.logger.group,
            job_type=cfg.logger.job_type, name=run_name(overrides), tags=tags, config=config,
            dir=str(run_dir), mode=mode, id=run_id, resume="allow",
            settings=wandb.Settings(silent=True, console="off", init_timeout=90),
        )

    def _make_bar(self, total: int, start: int) -> Any:
        from tqdm import tqdm

        tty = sys.stderr.isatty()
        return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                    mininterval=0.5 if tty else 10.0, file=sys.stderr, leave=True)

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {k: _finite(v) for k, v in metrics.items()}
        self._file.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log({_wandb_key(k): v for k, v in row.items() if v is not None and k != "step"},
                            step=int(row["step"]))
        if self._bar is not None and "loss" in row:
            self._bar.n = int(row["step"])
            self._bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row.get('tokens_per_s', 0):.0f}", refresh=False)
            self._bar.refresh()
        elif self._bar is not None and "eval_loss" in row:
            self._bar.write(f"step {row['step']}: eval_loss {row['eval_loss']:.4f}")

    def write_summary(self, summary: dict[str, Any]) -> None:
        if not self.enabled:
            return
        write_json_atomic(self.run_dir / "summary.json", summary)
        if self._wandb is not None:
            for key in ("final_loss", "final_eval_loss", "best_eval_loss", "tokens_seen", "wall_s", "status", "steps"):
                if summary.get(key) is not None:
                    self._wandb.summary[key] = summary[key]

    def finish(self, exit_code: int) -> None:
        """Always called, even after a failure, so the next job of a multirun starts clean."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish(exit_code=exit_code)
            self._wandb = None


def _wandb_key(name: str) -> str:
    if name in _WANDB_KEYS:
        return _WANDB_KEYS[name]
    return name if "/" in name else f"train/{name}"


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)
