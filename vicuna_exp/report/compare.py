"""What the comparison says: the table's columns and rows, and what was (not) held constant.

Kept apart from rendering so the console table, report.md and report.html show the same
numbers, and tests can check values rather than markup.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vicuna_exp.report.collect import ARM, Job, Sweep, job_label, max_metric, median_metric


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    kind: str  # text | int | loss | tokens | rate | seconds | float | percent | gb
    get: Callable[[Job], Any]
    optional: bool = False  # shown only when some job has a value
    only_if_varied: bool = False  # shown only when two jobs have different values


def _axis_getter(key: str) -> Callable[[Job], Any]:
    if key == ARM:
        return lambda j: j.arm
    return lambda j: j.override_map.get(key)


def _derived(key: str) -> Callable[[Job], Any]:
    """A fact the run derived (summary.json `derived`: trainable parameters, the measured bytes per token)."""
    return lambda j: (j.summary.get("derived") or {}).get(key)


def _eval_getter(key: str) -> Callable[[Job], Any]:
    return lambda j: j.eval_summary.get(key)


_FIXED_COLUMNS = [
    Column("status", "status", "text", lambda j: j.status),
    Column("steps", "steps", "int", lambda j: j.stat("steps")),
    Column("final_loss", "final loss", "loss", lambda j: j.stat("final_loss")),
    Column("final_eval_loss", "final eval_loss", "loss", lambda j: j.stat("final_eval_loss")),
    Column("best_eval_loss", "best eval_loss", "loss", lambda j: j.stat("best_eval_loss")),
    Column("tokens_seen", "tokens seen", "tokens", lambda j: j.stat("tokens_seen")),
    Column("tokens_per_s", "tokens/s", "rate", lambda j: j.stat("tokens_per_s")),
    Column("wall_s", "wall time", "seconds", lambda j: j.stat("wall_s")),
    Column("packing_efficiency", "packing eff.", "percent", lambda j: median_metric(j, "packing_efficiency", False), True),
    Column("mfu", "MFU", "percent", lambda j: median_metric(j, "mfu"), True),
    Column("peak_mem_gb", "peak mem", "gb", lambda j: max_metric(j, "peak_mem_gb"), True),
    # What a sweep of methods or bases varies besides its axes: shown only where the arms differ.
    Column("trainable_params", "trainable", "tokens", _derived("trainable_params"), True, only_if_varied=True),
    Column("tokens_per_step", "tokens/step", "int", _derived("tokens_per_step"), True, only_if_varied=True),
    Column("bytes_per_token", "bytes/token", "float", _derived("bytes_per_token"), True),
]


@dataclass
class Table:
    columns: list[Column]
    rows: list[dict[str, Any]]  # column key -> raw value (None = blank)

    def cells(self, row: dict[str, Any]) -> list[str]:
        return [fmt(c.kind, row.get(c.key)) for c in self.columns]


def build_table(sweep: Sweep) -> Table:
    """A row per job: its label by the swept axes, the fixed metrics, then eval columns if any.

    Each row also carries, outside the columns, the job's dir name (`name`) and its raw axis values
    (`axis:<key>`), for callers that look a job up rather than show it.
    """
    columns = [Column("job", "job", "text", lambda j: job_label(sweep, j))]
    columns += _FIXED_COLUMNS
    taken = {c.title for c in columns}
    eval_keys: list[str] = []
    for j in sweep.jobs:
        eval_keys.extend(k for k in j.eval_summary if k not in eval_keys)
    for k in eval_keys:
        title = k if k not in taken else f"eval/{k}"
        kind = "float" if any(_is_num(j.eval_summary.get(k)) for j in sweep.jobs) else "text"
        columns.append(Column(f"eval:{k}", title, kind, _eval_getter(k)))
    columns.append(Column("note", "note", "text", _note))

    hidden = [Column("name", "name", "text", lambda j: j.name)]
    hidden += [Column(f"axis:{a}", a, "text", _axis_getter(a)) for a in sweep.axes]
    rows = [{c.key: _safe(c.get, j) for c in [*columns, *hidden]} for j in sweep.jobs]
    columns = [c for c in columns if not c.optional or any(r.get(c.key) is not None for r in rows)]
    columns = [c for c in columns if not c.only_if_varied or len(_distinct([r.get(c.key) for r in rows])) > 1]
    return Table(columns=columns, rows=rows)


def _note(job: Job) -> str | None:
    parts = []
    if job.error:
        parts.append(_one_line(job.error))
    parts.extend(n for n in job.notes if n not in parts)
    return "; ".join(parts) or None


def _safe(get: Callable[[Job], Any], job: Job) -> Any:
    """A value that cannot be computed for this job is a blank, not a crash."""
    try:
        v = get(job)
    except (TypeError, ValueError, KeyError, AttributeError):
        return None
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def fmt(kind: str, v: Any) -> str:
    if v is None or v == "":
        return ""
    if kind == "text" or not _is_num(v):
        return str(v)
    if kind == "float" and isinstance(v, int):
        return f"{v:,}"
    v = float(v)
    if kind == "int":
        return f"{int(v):,}"
    if kind == "loss":
        return f"{v:.4f}"
    if kind == "tokens":
        return _si(v)
    if kind == "rate":
        return _si(v) if v >= 10_000 else f"{v:,.1f}"
    if kind == "seconds":
        return _duration(v)
    if kind == "percent":
        return f"{100 * v:.1f}%" if v <= 1.0 else f"{v:.1f}%"
    if kind == "gb":
        return f"{v:.2f} GB"
    return f"{v:.4g}"


def _si(v: float) -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.0f}" if float(v).is_integer() else f"{v:.3g}"


def _duration(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _one_line(text: str, limit: int = 160) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    line = lines[-1] if lines else ""  # a traceback's last line names the error
    return line if len(line) <= limit else line[: limit - 1] + "…"


# ---------------------------------------------------------------- what was held constant

# Config keys that decide whether arms are comparable; reported as held or varied.
FAIRNESS_KEYS = (
    "trainer.tokens_per_step", "trainer.global_batch_size", "trainer.micro_batch_size",
    "trainer.max_steps", "trainer.epochs", "trainer.seed", "trainer.eval_every_steps",
    "trainer.eval_max_rows", "trainer.precision", "optim.lr", "optim.schedule",
    "optim.warmup_ratio", "optim.weight_decay", "data.name", "data.path", "data.max_records",
    "data.eval_fraction", "data.seed", "data.packing", "data.overflow", "template.name",
)
# Differences here say nothing about what was trained (paths, run names, logging).
_IGNORED_PREFIXES = ("hydra.", "logger.", "launcher.rdzv", "launcher.node_rank", "trainer.resume", "plan.", "hardware.")


# Under trainer.bytes_per_step each run sets these from its measured bytes per token (`_text_per_step`).
_SET_BY_TEXT = ("trainer.tokens_per_step", "trainer.global_batch_size")

# Real tokens differ a little between arms with equal tokens per step: packing leaves different gaps.
TOKEN_TOLERANCE = 0.05


@dataclass
class Fairness:
    held: list[str] = field(default_factory=list)  # "key = value", shared by every job
    varied: list[str] = field(default_factory=list)  # "key: a | b" beyond the declared overrides
    caveats: list[str] = field(default_factory=list)  # what could not be held constant
    data_stats: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (job, stats)


def assess_fairness(sweep: Sweep) -> Fairness:
    jobs = [j for j in sweep.jobs if j.readable]
    out = Fairness()
    if not jobs:
        return out
    with_cfg = [j for j in jobs if j.config]
    keys: list[str] = []
    for j in with_cfg:
        keys.extend(k for k in j.config if k not in keys)

    def values(key: str) -> list[Any]:
        return [j.config.get(key) for j in with_cfg]

    by_text = any(j.config.get("trainer.bytes_per_step") is not None for j in with_cfg)
    for key in keys:
        if key.startswith(_IGNORED_PREFIXES) or (by_text and key in _SET_BY_TEXT):
            continue
        vals = values(key)
        distinct = _distinct(vals)
        if len(distinct) == 1 and key in FAIRNESS_KEYS and all(key in j.config for j in with_cfg):
            out.held.append(f"{key} = {_short(distinct[0])}")
        elif len(distinct) > 1:
            out.varied.append(f"{key}: " + " | ".join(_short(v) for v in distinct))
    _eval_split(values, out)

    _token_budget(sweep, jobs, out)
    _text_per_step(sweep, with_cfg, out)
    _config_caveats(with_cfg, values, out)
    for j in jobs:
        stats = j.summary.get("data_stats")
        if isinstance(stats, dict) and stats:
            out.data_stats.append((j.name, stats))
    if out.data_stats or any(median_metric(j, "packing_efficiency", False) is not None for j in jobs):
        out.caveats.append("Per-arm data statistics are listed below: they show how each arm's settings "
                           "(e.g. its context length) shaped the batches built from the same conversations.")
    return out


def _short(v: Any, limit: int = 60) -> str:
    text = str(v)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _eval_split(values: Callable[[str], list[Any]], out: Fairness) -> None:
    fractions, seeds = _distinct(values("data.eval_fraction")), _distinct(values("data.seed"))
    sources = _distinct([(n, p) for n, p in zip(values("data.name"), values("data.path"), strict=True)])
    if len(fractions) == 1 and len(seeds) == 1 and len(sources) == 1 and fractions[0] is not None:
        out.held.append(f"eval split: the same held-out conversations for every arm ({fractions[0]} of "
                        f"the conversations, chosen by a hash of their id with data.seed = {seeds[0]}); "
                        "eval_loss is the mean loss per supervised token on that split")
    elif fractions != [None]:
        out.caveats.append("The eval split differs between jobs (data source, data.eval_fraction or "
                           "data.seed): their eval_loss values are measured on different conversations.")


def _distinct(vals: list[Any]) -> list[Any]:
    out: list[Any] = []
    for v in vals:
        if v not in out:
            out.append(v)
    return out


def _token_budget(sweep: Sweep, jobs: list[Job], out: Fairness) -> None:
    done = [j for j in jobs if j.status == "completed"]
    ratios = [(j.summary.get("derived") or {}).get("bytes_per_token") for j in done]
    if done and all(_is_num(r) for r in ratios):  # trainer.bytes_per_step: the text is what was held
        what, unit, budget = "text", " bytes", "Text budget"
        seen = [(job_label(sweep, j), j.stat("tokens_seen") * r if _is_num(j.stat("tokens_seen")) else None)
                for j, r in zip(done, ratios, strict=True)]
    else:
        what, unit, budget = "real tokens", "", "Token budget"
        seen = [(job_label(sweep, j), j.stat("tokens_seen")) for j in done]
    seen = [(n, float(t)) for n, t in seen if _is_num(t)]
    if len(seen) < 2:
        return
    lo, hi = min(t for _, t in seen), max(t for _, t in seen)
    spread = (hi - lo) / lo if lo > 0 else float("inf")
    if spread <= TOKEN_TOLERANCE:
        why = "whole rows per step, and packing fills them differently" if unit else "packing fills rows differently"
        span = _si(lo) + unit if lo == hi else f"{_si(lo)}{unit} to {_si(hi)}{unit} ({100 * spread:.1f}% apart: {why})"
        out.held.append(f"{what} seen by every completed job: {span}"
                        + (" (tokens seen x the arm's measured bytes per token)" if unit else ""))
    else:
        detail = ", ".join(f"{n}: {_si(t)}" for n, t in seen)
        out.caveats.append(f"{budget} differed between completed jobs by {100 * spread:.0f}% ({detail}); "
                           "compare eval_loss at equal tokens in the plot, not the final values.")


def _text_per_step(sweep: Sweep, jobs: list[Job], out: Fairness) -> None:
    """Under `trainer.bytes_per_step`: the text held per step, and each arm's measured bytes per token
    and the tokens per step it gave (`vicuna_exp.text_budget`)."""
    held = _distinct([j.config.get("trainer.bytes_per_step") for j in jobs])
    if held == [None]:
        return
    measured = [(job_label(sweep, j), (j.summary.get("derived") or {})) for j in jobs]
    per_arm = "; ".join(f"{name}: {d['bytes_per_token']:.3f} bytes/token, {d.get('tokens_per_step', 0):,} tokens/step"
                        for name, d in measured if _is_num(d.get("bytes_per_token")))
    if len(held) == 1:
        out.held.append(f"text per optimizer step: trainer.bytes_per_step = {held[0]:,} bytes of conversation in "
                        "every arm; each arm's tokens per step come from the bytes per token measured on its "
                        f"own prepared train split ({per_arm or 'not measured: no job got that far'})")
    else:
        out.caveats.append("trainer.bytes_per_step differs between arms (" + " | ".join(str(v) for v in held)
                           + "): the arms step over different amounts of text.")


def _config_caveats(with_cfg: list[Job], values: Callable[[str], list[Any]], out: Fairness) -> None:
    if not with_cfg:
        out.caveats.append("No job has a readable .hydra/config.yaml: held-constant settings are "
                           "known only from the overrides.")
        return
    if len(_distinct(values("context.length"))) > 1:
        lengths = " vs ".join(str(v) for v in _distinct(values("context.length")))
        out.caveats.append(
            f"context.length differs ({lengths}): long conversations are split into different "
            "segments, so the arms train on, and are evaluated on, differently cut examples drawn "
            "from the same conversations. eval_loss is per supervised token and stays comparable, "
            "but not over identical token sets.")
        if len(_distinct(values("trainer.tokens_per_step"))) > 1 or values("trainer.tokens_per_step")[0] is None:
            out.caveats.append("trainer.tokens_per_step is not the same fixed value in every arm: "
                               "the arms differ in tokens per optimizer step as well as in context.")
    model_keys = ("model.name", "model.hidden_size", "model.num_hidden_layers")
    if any(len(_distinct(values(k))) > 1 for k in model_keys):
        out.caveats.append("Model size differs: tokens/s and wall time reflect different compute per "
                           "token; compare eval_loss against tokens seen.")
    backend_keys = ("backend.name", "backend.zero_stage", "backend.sharding")
    if any(len(_distinct(values(k))) > 1 for k in backend_keys):
        out.caveats.append("Backend differs: the same data order and seed, but reduction order and "
                           "sharded numerics make losses agree only to rounding, not bit for bit.")
    if any(len(_distinct(values(k))) > 1 for k in ("launcher.nproc_per_node", "launcher.nnodes")):
        out.caveats.append("World size differs: tokens/s counts all ranks together.")
