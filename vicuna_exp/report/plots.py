"""PNG plots of a sweep: loss and eval_loss against tokens seen (one line per arm), throughput bars.

Tokens seen, not steps, on the x axis: arms with different tokens per step are only comparable
at equal data. When the arms' token counts differ by LOG_X_RATIO or more (packed against unpacked
rows see ~10x fewer tokens), the axis is logarithmic, so the short arms are not squeezed against
it. matplotlib's Agg backend, so plots render on machines without a display.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vicuna_exp.report.collect import Job, Sweep, eval_points, job_label, train_points

LOG_X_RATIO = 4.0  # the largest arm's last x over the smallest's, from which the x axis is logarithmic


@dataclass
class Plot:
    name: str  # file stem, e.g. "loss"
    title: str
    path: Path | None  # None: no job had data for it
    why_missing: str = ""


def arm_label(sweep: Sweep, job: Job) -> str:
    """The arm's axis values (`context=512, backend=fsdp`), with its status unless it completed."""
    label = job_label(sweep, job)
    return label if job.status == "completed" else f"{label} ({job.status})"


def write_plots(sweep: Sweep, out_dir: Path, prefix: str = "report_") -> list[Plot]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    jobs = [j for j in sweep.jobs if j.readable]
    plots = [
        _lines(plt, sweep, jobs, out_dir / f"{prefix}loss.png", "loss", "Training loss vs tokens seen",
               "training loss", lambda j: train_points(j, "loss")),
        _lines(plt, sweep, jobs, out_dir / f"{prefix}eval_loss.png", "eval_loss",
               "eval_loss (per supervised token) vs tokens seen", "eval_loss", eval_points),
        _bars(plt, sweep, jobs, out_dir / f"{prefix}throughput.png"),
    ]
    return plots


def _lines(plt, sweep: Sweep, jobs: list[Job], path: Path, name: str, title: str, ylabel: str, points) -> Plot:
    series = [(arm_label(sweep, j), points(j)) for j in jobs]
    series = [(label, pts) for label, pts in series if pts]
    if not series:
        return Plot(name, title, None, f"no job logged `{name}` with `tokens`")
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    try:
        for label, pts in series:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3, label=label)
        ax.set_title(title)
        log_x = wants_log_x([pts for _, pts in series])
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel("tokens seen (log scale)" if log_x else "tokens seen")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return Plot(name, title, path)


def wants_log_x(series: list[list[tuple[float, float]]]) -> bool:
    """True when the arms end LOG_X_RATIO or more apart in x (all x > 0, as tokens seen are)."""
    ends = [pts[-1][0] for pts in series if pts]
    return bool(ends) and min(ends) > 0 and max(ends) / min(ends) >= LOG_X_RATIO and all(
        x > 0 for pts in series for x, _ in pts)


def _bars(plt, sweep: Sweep, jobs: list[Job], path: Path) -> Plot:
    title = "Throughput (median tokens/s, all ranks)"
    bars = []
    for j in jobs:
        v = j.stat("tokens_per_s")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            bars.append((arm_label(sweep, j), float(v)))
    if not bars:
        return Plot("throughput", title, None, "no job logged `tokens_per_s`")
    fig, ax = plt.subplots(figsize=(7.5, 0.5 * len(bars) + 1.5), dpi=110)
    try:
        labels, values = zip(*bars, strict=True)
        ypos = list(range(len(bars)))
        ax.barh(ypos, values, color="#4c72b0")
        ax.set_yticks(ypos, labels=labels, fontsize="small")
        ax.invert_yaxis()
        for y, v in zip(ypos, values, strict=True):
            ax.annotate(f"{v:,.0f}", (v, y), xytext=(3, 0), textcoords="offset points", va="center",
                        fontsize="small")
        ax.set_xlabel("tokens/s")
        ax.set_title(title)
        ax.margins(x=0.15)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return Plot("throughput", title, path)
