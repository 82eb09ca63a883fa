"""Read a sweep back from its run dirs alone: summary, metrics, overrides, config.

Reports must work offline and long after the fact, so everything here reads plain files and
never raises on a bad job: a job whose files are missing or corrupt becomes `unreadable`, with
the reason, and the rest of the sweep is still reported.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vicuna_exp.rundir import RESOLVED_CONFIG

ARM = "arm"  # the axis of a sweep with `arms` (vicuna_exp.sweep.ARM_KEY)
# A directory holding any of these is a job's run dir.
_JOB_MARKERS = ("summary.json", "metrics.jsonl", ".hydra")
# Where a job dir's own outputs live: never searched for nested jobs.
_NOT_JOBS = {"checkpoints", "final", "eval", "wandb", ".hydra", "__pycache__"}
_MAX_DEPTH = 3


@dataclass
class Job:
    """One job of a sweep, as far as its files could be read."""

    name: str  # its dir relative to the sweep root (or the sweep.json name when it has no dir)
    path: Path | None
    status: str  # completed | failed | interrupted | skipped | running | unreadable
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    train: list[dict[str, Any]] = field(default_factory=list)  # metrics lines with `loss`
    evals: list[dict[str, Any]] = field(default_factory=list)  # metrics lines with `eval_loss`
    config: dict[str, Any] = field(default_factory=dict)  # flattened .hydra/config.yaml
    eval_summary: dict[str, Any] = field(default_factory=dict)  # from vicuna_exp.eval.report
    arm: str | None = None  # a sweep with `arms`: the arm's name (sweep.json, else the `arm=NAME` dir)

    @property
    def readable(self) -> bool:
        return self.status != "unreadable"

    @property
    def override_map(self) -> dict[str, str]:
        return dict(parse_override(o) for o in self.overrides)

    def stat(self, key: str) -> Any:
        """A summary value, else the same fact derived from metrics.jsonl, else None."""
        value = self.summary.get(key)
        if value is not None:
            return value
        derive = _DERIVED.get(key)
        return derive(self) if derive else None


@dataclass
class Sweep:
    root: Path
    jobs: list[Job]
    meta: dict[str, Any]  # sweep.json, or {} when absent
    axes: list[str]  # override keys whose values differ across readable jobs
    constant_overrides: list[str]  # overrides shared verbatim by every readable job
    warnings: list[str] = field(default_factory=list)


def job_label(sweep: Sweep, job: Job) -> str:
    """A job by its swept axes alone (`context=512, packing=true`), else by its dir name.

    Each axis goes by its last key component unless two axes share it; booleans read as YAML
    writes them. What every job shares is listed once, as the sweep's held-constant overrides.
    """
    m = {ARM: job.arm or "", **job.override_map}
    short = {a: a.rsplit(".", 1)[-1] for a in sweep.axes}
    names = {a: short[a] if list(short.values()).count(short[a]) == 1 else a for a in sweep.axes}
    parts = [f"{names[a]}={_yaml_word(m[a])}" for a in sweep.axes if a in m]
    return ", ".join(parts) if parts else job.name


def _yaml_word(value: str) -> str:
    return value.lower() if value in ("True", "False") else value


def parse_override(text: str) -> tuple[str, str]:
    """`+trainer.x=1` -> (`trainer.x`, `1`); a deletion `~key` -> (`key`, `<deleted>`)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if key.startswith("~"):
        return key.lstrip("~"), "<deleted>" if not sep else f"<deleted:{value}>"
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]  # `context='512'`: quoted only so Hydra reads a group option, not an int
    return key.lstrip("+"), value


def load_sweep(root: Path) -> Sweep:
    """Every job under `root`; jobs listed in sweep.json but without a dir are included too."""
    warnings: list[str] = []
    meta: dict[str, Any] = {}
    if (root / "sweep.json").exists():
        try:
            loaded = json.loads((root / "sweep.json").read_text())
            if not isinstance(loaded, dict):
                raise ValueError("not a JSON object")
            meta = loaded
        except (OSError, ValueError) as e:
            warnings.append(f"sweep.json unreadable ({e}); job statuses come from the job dirs only")

    listed: dict[str, dict[str, Any]] = {}
    for entry in meta.get("jobs", []) if isinstance(meta.get("jobs"), list) else []:
        if not isinstance(entry, dict):
            continue
        name = entry.get("name")
        if not isinstance(name, str) or not name:  # planned, never given a dir
            name = "(not run) " + " ".join(str(o) for o in entry.get("overrides") or [])
        listed[name] = entry

    jobs = []
    dirs = find_job_dirs(root)
    for d in dirs:
        name = "." if d == root else d.relative_to(root).as_posix()
        in_listing = name in listed
        job = read_job(d, name, listed.pop(name, None))
        if meta.get("jobs") and not in_listing:
            job.notes.append("not part of the latest run of this sweep (sweep.json)")
        jobs.append(job)
    for name, entry in listed.items():  # sweep.json knows of jobs that left no dir behind
        jobs.append(_job_from_listing(name, entry))

    readable = [j for j in jobs if j.readable]
    axes, constant = _split_overrides(readable, preferred=list(meta.get("axes") or []))
    axes = _arm_axes(jobs, meta, axes)
    return Sweep(root=root, jobs=jobs, meta=meta, axes=axes, constant_overrides=constant, warnings=warnings)


def _arm_axes(jobs: list[Job], meta: dict[str, Any], axes: list[str]) -> list[str]:
    """A sweep with `arms` (`vicuna_exp.sweep.load_arms`): the arm is the first axis, and the keys
    the arms set are not axes of their own (the arm's name stands for them)."""
    arms = meta.get("arms")
    for j in jobs:
        top = j.name.split("/", 1)[0]
        listed = next((e.get(ARM) for e in meta.get("jobs") or [] if isinstance(e, dict) and e.get("name") == j.name),
                      None)
        j.arm = str(listed) if listed else (top.partition("=")[2].split(",")[0] if top.startswith(f"{ARM}=") else None)
    if not any(j.arm for j in jobs):
        return axes
    arm_keys = {parse_override(o)[0] for ovs in arms.values() for o in ovs} if isinstance(arms, dict) else set()
    return [ARM, *(a for a in axes if a not in arm_keys)]


def find_job_dirs(root: Path) -> list[Path]:
    """Run dirs under `root`, searched a few levels deep (Hydra nests `multirun/<date>/<n>`)."""
    if _is_job_dir(root):
        return [root]
    found: list[Path] = []

    def walk(d: Path, depth: int) -> None:
        try:
            children = sorted(p for p in d.iterdir() if p.is_dir() and p.name not in _NOT_JOBS)
        except OSError:
            return
        for c in children:
            if _is_job_dir(c):
                found.append(c)
            elif depth < _MAX_DEPTH:
                walk(c, depth + 1)

    walk(root, 1)
    return sorted(found, key=lambda p: _natural_key(p.relative_to(root).as_posix()))


def read_job(path: Path, name: str, listing: dict[str, Any] | None = None) -> Job:
    job = Job(name=name, path=path, status="unreadable")
    listing = listing or _own_sweep_record(path)

    overrides, why = _read_overrides(path)
    if why:
        job.notes.append(why)
    config, why = _read_config(path)
    if why:
        job.notes.append(why)
    job.config = config

    summary, summary_problem = _read_json_object(path / "summary.json")
    if summary is not None:
        job.summary = summary
        if overrides is None and isinstance(summary.get("overrides"), list):
            overrides = [str(o) for o in summary["overrides"]]
    if overrides is None and isinstance(listing.get("overrides"), list):
        overrides = [str(o) for o in listing["overrides"]]
    job.overrides = overrides or []

    metrics_problem = None
    if (path / "metrics.jsonl").exists():
        try:
            job.train, job.evals = read_metrics(path / "metrics.jsonl")
        except (OSError, ValueError) as e:
            metrics_problem = f"metrics.jsonl: {e}"

    listed_status = listing.get("status")
    if summary_problem or metrics_problem:
        problem = summary_problem or metrics_problem
        if listed_status in ("failed", "interrupted", "skipped") and not metrics_problem:
            # The sweep saw this job end; its own files never got that far.
            job.status = str(listed_status)
            job.error = listing.get("error")
            job.notes.append("no summary.json: the job ended before training started"
                             if summary_problem and "missing" in summary_problem else str(problem))
        else:
            job.status = "unreadable"
            job.error = problem
            job.train, job.evals, job.summary = [], [], {}
        return job

    status = summary.get("status") if summary else None
    job.status = str(status) if isinstance(status, str) and status else "unreadable"
    if job.status == "unreadable":
        job.error = "summary.json: no `status`"
    if listed_status == "skipped" and job.status == "completed":
        job.notes.append("completed by an earlier run of this sweep; skipped on rerun")
    err = summary.get("error") if summary else None
    if err:
        job.error = str(err)
    return job


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Training and eval lines. An unterminated last line (a writer killed mid-line) is dropped;
    any other line that is not a JSON object makes the file corrupt."""
    text = path.read_text()
    lines = text.split("\n")
    train: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if i == len(lines) and not text.endswith("\n"):
                break
            raise ValueError(f"line {i} is not a JSON object ({e})") from None
        if _is_number(rec.get("eval_loss")):
            evals.append(rec)
        if _is_number(rec.get("loss")):
            train.append(rec)
    return train, evals


def eval_points(job: Job) -> list[tuple[float, float]]:
    """(tokens seen, eval_loss): an eval line's own `tokens`, else that of the last training
    line at or before its step."""
    points = []
    for e in job.evals:
        tokens = e.get("tokens")
        if not _is_number(tokens):
            step = e.get("step")
            before = [t for t in job.train if _is_number(t.get("tokens")) and _is_number(step)
                      and _is_number(t.get("step")) and t["step"] <= step]
            tokens = before[-1]["tokens"] if before else (0 if step == 0 else None)
        if tokens is not None:
            points.append((float(tokens), float(e["eval_loss"])))
    return points


def train_points(job: Job, key: str = "loss") -> list[tuple[float, float]]:
    return [(float(t["tokens"]), float(t[key])) for t in job.train
            if _is_number(t.get("tokens")) and _is_number(t.get(key))]


def median_metric(job: Job, key: str, skip_first: bool = True) -> float | None:
    """Median over training lines; the first line is skipped when there are others because it
    carries start-up cost (allocator warm-up, compilation)."""
    values = [float(t[key]) for t in job.train if _is_number(t.get(key))]
    if skip_first and len(values) > 1:
        values = values[1:]
    return statistics.median(values) if values else None


def max_metric(job: Job, key: str) -> float | None:
    values = [float(t[key]) for t in job.train if _is_number(t.get(key))]
    return max(values) if values else None


def _last(job: Job, lines_attr: str, key: str) -> Any:
    for rec in reversed(getattr(job, lines_attr)):
        if _is_number(rec.get(key)):
            return rec[key]
    return None


_DERIVED = {
    "final_loss": lambda j: _last(j, "train", "loss"),
    "final_eval_loss": lambda j: _last(j, "evals", "eval_loss"),
    "best_eval_loss": lambda j: min((e["eval_loss"] for e in j.evals), default=None),
    "tokens_seen": lambda j: _last(j, "train", "tokens"),
    "steps": lambda j: _last(j, "train", "step"),
    "wall_s": lambda j: _last(j, "train", "elapsed_s"),
    "tokens_per_s": lambda j: median_metric(j, "tokens_per_s"),
}


# Overrides that do not change what is trained: neither axes nor "held constant".
_NOT_TRAINING = ("logger", "hydra", "trainer.resume")


def _split_overrides(jobs: list[Job], preferred: list[str]) -> tuple[list[str], list[str]]:
    maps = [j.override_map for j in jobs]
    keys: list[str] = []
    for m in maps:
        keys.extend(k for k in m if k not in keys and k.split(".")[0] not in _NOT_TRAINING[:2]
                    and k != _NOT_TRAINING[2])
    axes = [k for k in keys if len({m.get(k) for m in maps}) > 1]
    order = {k: i for i, k in enumerate(preferred)}
    axes.sort(key=lambda k: (order.get(k, len(order)), keys.index(k)))
    constant = [f"{k}={maps[0][k]}" for k in keys if k not in axes and all(k in m for m in maps)]
    return axes, constant


def _read_overrides(path: Path) -> tuple[list[str] | None, str | None]:
    f = path / ".hydra" / "overrides.yaml"
    if not f.exists():
        return None, None
    try:
        import yaml

        data = yaml.safe_load(f.read_text())
    except Exception as e:  # noqa: BLE001 - any parse failure means "unreadable", not a crash
        return None, f".hydra/overrides.yaml unreadable ({type(e).__name__})"
    if data is None:
        return [], None
    if not isinstance(data, list):
        return None, ".hydra/overrides.yaml is not a list"
    return [str(o) for o in data], None


def _read_config(path: Path) -> tuple[dict[str, Any], str | None]:
    f = path / ".hydra" / "config.yaml"
    if not f.exists():
        return {}, None
    try:
        import yaml

        data = yaml.safe_load(f.read_text())
    except Exception as e:  # noqa: BLE001
        return {}, f".hydra/config.yaml unreadable ({type(e).__name__})"
    if not isinstance(data, dict):
        return {}, ".hydra/config.yaml is not a mapping"
    return {**flatten(data), **_lr_in_force(path)}, None


def _lr_in_force(path: Path) -> dict[str, Any]:
    """`optim.lr` as the run trained with it: the method's own rate (finetune.lr, lr_by_method) is set
    after composing, so .hydra/config.yaml holds the preset's; the run dir's resolved config has it."""
    f = path / RESOLVED_CONFIG
    try:
        import yaml

        optim = (yaml.safe_load(f.read_text()) or {}).get("config", {}).get("optim", {})
    except Exception:  # noqa: BLE001 - absent or unreadable: the composed config's value stands
        return {}
    return {f"optim.{k}": optim[k] for k in ("lr", "lr_source") if isinstance(optim, dict) and k in optim}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _read_json_object(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    if not path.exists():
        return None, f"{path.name}: missing (job still running, or killed before it could write it)"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return None, f"{path.name}: not valid JSON ({e})"
    if not isinstance(data, dict):
        return None, f"{path.name}: not a JSON object"
    return data, None


def _own_sweep_record(path: Path) -> dict[str, Any]:
    """What `vicuna-exp sweep` recorded in the job dir, as a sweep.json entry (when sweep.json is gone)."""
    record, _ = _read_json_object(path / "sweep_job.json")
    if not record or record.get("exit_code") in (None, 0):
        return {}
    status = "interrupted" if record.get("exit_code") == 75 else "failed"
    return {"status": status, "error": record.get("error"), "overrides": record.get("overrides")}


def _job_from_listing(name: str, entry: dict[str, Any]) -> Job:
    status = entry.get("status")
    overrides = entry.get("overrides")
    return Job(
        name=name,
        path=None,
        status=str(status) if status in ("failed", "interrupted", "skipped") else "unreadable",
        error=str(entry.get("error") or "no run dir"),
        notes=["listed in sweep.json; no run dir found"],
        overrides=[str(o) for o in overrides] if isinstance(overrides, list) else [],
    )


def _is_job_dir(d: Path) -> bool:
    return any((d / m).exists() for m in _JOB_MARKERS)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _natural_key(s: str) -> list[Any]:
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]
