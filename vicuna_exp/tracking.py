"""Where metrics go: `metrics.jsonl` (plain names, read by scripts and reports), Weights & Biases
(namespaced keys, rank 0 only) and a console progress bar. The only module that calls wandb.

wandb is online only when an API key is configured; otherwise offline, so a run never hangs on
a login prompt, and no key is ever written anywhere by this project. The tracker never stops
training: `init` and `finish` are bounded by `logger.init_timeout_s`, a server that cannot be
reached means offline logging (`vicuna-exp sync RUN_DIR` uploads it later), and a later wandb
error is logged once, after which the run goes on with `metrics.jsonl` alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
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
from vicuna_exp.diskspace import writing

log = logging.getLogger(__name__)
# metrics.jsonl name -> wandb key
TRIAL_ENV = "VICUNA_EXP_TRIAL"  # set in a search trial's job: {"study", "number", "params"} as JSON
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
        self._wandb_failed = False
        self._bar = None
        if not enabled:
            return
        self._truncate_after(start_step)
        self._file = self.metrics_path.open("ab", buffering=0)  # unbuffered: a line is on disk once logged
        if cfg.logger.name == LoggerName.wandb:
            self._wandb = self._init_wandb(cfg, run_dir, overrides, extra_config or {})
        self._bar = self._make_bar(total_steps, start_step)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines the interrupted attempt logged after its last checkpoint."""
        if not self.metrics_path.exists():
            return
        kept, lines = [], self.metrics_path.read_text().splitlines()
        for line in lines:
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut off by a kill
        if len(kept) < len(lines):  # written beside it and renamed: a full disk leaves the old file whole
            tmp = self.metrics_path.with_name(f".{self.metrics_path.name}.{os.getpid()}.tmp")
            with writing("metrics", self.metrics_path, partial=tmp):
                tmp.write_text("".join(f"{line}\n" for line in kept))
                os.replace(tmp, self.metrics_path)

    def _init_wandb(self, cfg: DictConfig, run_dir: Path, overrides: list[str], extra: dict[str, Any]) -> Any:
        mode = resolve_wandb_mode(cfg.logger.mode)
        if mode == "disabled":
            return None
        import wandb

        config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        assert isinstance(config, dict)
        config["derived"] = extra
        trial = os.environ.get(TRIAL_ENV)
        if trial:  # a trial of a search (vicuna_exp.optuna_sweeper): its study, number and parameters
            try:
                config["trial"] = json.loads(trial)
            except ValueError:
                log.warning("%s is not JSON (%r); the wandb config goes without the trial", TRIAL_ENV, trial[:80])
        tags = list(cfg.logger.tags) + [f"model={cfg.model.name}", f"context={cfg.context.length}",
                                        f"backend={cfg.backend.name}"]
        # The run id is stable per run dir, so a resumed run continues the same wandb run.
        run_id_file = run_dir / ".wandb_run_id"
        run_id = run_id_file.read_text().strip() if run_id_file.exists() else uuid.uuid4().hex[:8]
        run_id_file.write_text(run_id)
        timeout = float(cfg.logger.init_timeout_s)
        kwargs = dict(project=cfg.logger.project, entity=cfg.logger.entity, group=cfg.logger.group,
                      job_type=cfg.logger.job_type, name=run_name(overrides), tags=tags, config=config,
                      dir=str(run_dir), id=run_id, resume="allow",
                      settings=wandb.Settings(silent=True, console="off", init_timeout=timeout, finish_timeout=timeout))
        try:
            return wandb.init(mode=mode, **kwargs)
        except Exception as e:  # noqa: BLE001 - the tracker never stops training
            if mode != "online":
                self._wandb_error("init", e)
                return None
            log.warning("wandb: the server cannot be reached (%s); logging offline to %s instead. "
                        "`vicuna-exp sync %s` uploads it later", _first_line(e), run_dir / "wandb", run_dir)
        try:
            wandb.teardown()  # the failed online attempt still holds the run id
            return wandb.init(mode="offline", **kwargs)
        except Exception as e:  # noqa: BLE001
            self._wandb_error("offline init", e)
            return None

    def _wandb_error(self, what: str, e: BaseException) -> None:
        """Said once; wandb is then left alone for the rest of the run."""
        if not self._wandb_failed:
            log.warning("wandb %s failed (%s); training goes on, metrics.jsonl keeps the record",
                        what, _first_line(e))
        self._wandb_failed = True
        self._wandb = None

    def _make_bar(self, total: int, start: int) -> Any:
        from tqdm import tqdm

        tty = sys.stderr.isatty()
        return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                    mininterval=0.5 if tty else 10.0, file=sys.stderr, leave=True)

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {k: _finite(v) for k, v in metrics.items()}
        self._append(json.dumps(row) + "\n")
        if self._wandb is not None:
            try:
                self._wandb.log({_wandb_key(k): v for k, v in row.items() if v is not None and k != "step"},
                                step=int(row["step"]))
            except Exception as e:  # noqa: BLE001
                self._wandb_error("log", e)
        if self._bar is not None and "loss" in row:
            self._bar.n = int(row["step"])
            self._bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row.get('tokens_per_s', 0):.0f}", refresh=False)
            self._bar.refresh()
        elif self._bar is not None and "eval_loss" in row:
            self._bar.write(f"step {row['step']}: eval_loss {row['eval_loss']:.4f}")

    def _append(self, line: str) -> None:
        """One whole line or none: a line cut off by a full disk is taken back."""
        data = memoryview(line.encode())
        at = self._file.seek(0, os.SEEK_END)
        try:
            with writing("metrics", self.metrics_path, len(data)):
                while data:  # a short write is followed by the error that explains it
                    data = data[self._file.write(data):]
        except Exception:
            with contextlib.suppress(OSError):
                self._file.truncate(at)
            raise

    def write_summary(self, summary: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            write_json_atomic(self.run_dir / "summary.json", summary)
        finally:
            self._summary_to_wandb(summary)

    def _summary_to_wandb(self, summary: dict[str, Any]) -> None:
        if self._wandb is None:
            return
        try:
            for key in ("final_loss", "final_eval_loss", "best_eval_loss", "tokens_seen", "wall_s", "status", "steps"):
                if summary.get(key) is not None:
                    self._wandb.summary[key] = summary[key]
        except Exception as e:  # noqa: BLE001
            self._wandb_error("summary", e)

    def finish(self, exit_code: int) -> None:
        """Always called, even after a failure, so the next job of a multirun starts clean."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        with contextlib.suppress(OSError):  # a full disk: the lines already written are whole
            self._file.close()
        if self._wandb is not None:
            try:
                self._wandb.finish(exit_code=exit_code)  # bounded by its finish_timeout
            except Exception as e:  # noqa: BLE001
                self._wandb_error("finish", e)
            self._wandb = None


def _wandb_key(name: str) -> str:
    if name in _WANDB_KEYS:
        return _WANDB_KEYS[name]
    return name if "/" in name else f"train/{name}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def write_json_atomic(path: Path, obj: Any) -> None:
    """The old file stays whole until the new one is: a full disk leaves no temporary behind."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    text = json.dumps(obj, indent=2, default=str) + "\n"
    with writing(path.name, path, len(text.encode()), partial=tmp):
        tmp.write_text(text)
        os.replace(tmp, path)
