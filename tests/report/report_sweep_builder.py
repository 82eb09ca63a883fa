"""Hand-made sweep dirs for the report tests: exactly the files a finished sweep leaves behind."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml


def write_job(
    root: Path,
    name: str,
    overrides: list[str],
    *,
    status: str = "completed",
    steps: int = 4,
    tokens_per_step: int = 1000,
    loss0: float = 3.0,
    tokens_per_s: float = 500.0,
    eval_every: int | None = 2,
    extra_train: dict[str, Any] | None = None,
    summary_extra: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    error: str | None = None,
) -> Path:
    """A run dir whose loss halves linearly over `steps`; summary.json agrees with metrics.jsonl."""
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config or base_config(overrides)))
    lines, evals = [], []
    for step in range(1, steps + 1):
        rec = {"step": step, "epoch": 0.1 * step, "loss": loss0 * (1 - 0.5 * step / steps), "lr": 1e-3,
               "grad_norm": 1.0, "tokens": step * tokens_per_step, "supervised_tokens": step * tokens_per_step // 2,
               # the first step is slow (warm-up): the report must not let it drag the median
               "tokens_per_s": tokens_per_s / 10 if step == 1 else tokens_per_s,
               "step_s": 0.5, "elapsed_s": 0.5 * step}
        rec.update(extra_train or {})
        lines.append(rec)
        if eval_every and (step % eval_every == 0 or step == steps):
            evals.append({"step": step, "eval_loss": loss0 * (1 - 0.4 * step / steps)})
            lines.append(evals[-1])
    (job / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    summary = {
        "status": status, "error": error, "steps": steps,
        "final_loss": lines[-1 if not evals else -2]["loss"] if status == "completed" else None,
        "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "best_eval_loss": min(e["eval_loss"] for e in evals) if evals else None,
        "tokens_seen": steps * tokens_per_step, "wall_s": 0.5 * steps + 1.0,
        "overrides": overrides, "config_hash": "h-" + name,
        "provenance": {"git_commit": "abc", "versions": {}, "hardware": "cpu", "data_hash": "d"},
    }
    summary.update(summary_extra or {})
    (job / "summary.json").write_text(json.dumps(summary))
    return job


def base_config(overrides: list[str]) -> dict[str, Any]:
    """A composed config shaped like the project's: the overrides applied to a few sections."""
    cfg: dict[str, Any] = {
        "model": {"name": "tiny", "hidden_size": 64, "num_hidden_layers": 2},
        "context": {"length": 512},
        "data": {"name": "sample", "path": None, "eval_fraction": 0.02, "seed": 0, "packing": True},
        "template": {"name": "vicuna_v1.1"},
        "optim": {"lr": 1e-3, "schedule": "cosine", "warmup_ratio": 0.03, "weight_decay": 0.0},
        "trainer": {"tokens_per_step": 4096, "global_batch_size": 128, "micro_batch_size": 2, "seed": 42,
                    "max_steps": 4, "epochs": 1.0},
        "backend": {"name": "single"},
        "launcher": {"nproc_per_node": 1, "nnodes": 1},
        "logger": {"name": "wandb", "project": "vicuna-exp-test", "group": "ctx-sweep-1a2b"},
    }
    for o in overrides:
        key, _, value = o.lstrip("+").partition("=")
        if key == "context":
            cfg["context"]["length"] = int(value)
        elif key == "backend":
            cfg["backend"]["name"] = value
        elif "." in key:
            section, leaf = key.split(".", 1)
            cfg.setdefault(section, {})[leaf] = yaml.safe_load(value)
    return cfg
