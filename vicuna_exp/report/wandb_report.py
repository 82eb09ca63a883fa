"""The wandb Report of a sweep: the same panels as report.html, over the sweep's wandb group.

Building the Report touches no network (tests build it and inspect it); only `publish` saves it.
The metric names below are the contract with `vicuna_exp.tracking`, which logs them.
"""

from __future__ import annotations

from typing import Any

from vicuna_exp.report.collect import Sweep
from vicuna_exp.report.compare import Fairness

# wandb keys logged by the tracking module (metrics.jsonl keeps the plain names).
X_TOKENS = "train/tokens"
LOSS = "train/loss"
EVAL_LOSS = "eval/loss"
TOKENS_PER_S = "train/tokens_per_s"
# wandb run summary keys (from summary.json).
SUMMARY_KEYS = ("final_eval_loss", "best_eval_loss", "tokens_seen", "wall_s")


def sweep_group(sweep: Sweep) -> str:
    """The wandb group of the sweep: sweep.json's, else the jobs' `logger.group`, else the dir name."""
    group = sweep.meta.get("group")
    if isinstance(group, str) and group:
        return group
    for j in sweep.jobs:
        g = j.config.get("logger.group")
        if isinstance(g, str) and g:
            return g
    return sweep.root.resolve().name


def sweep_project(sweep: Sweep) -> str:
    for j in sweep.jobs:
        p = j.config.get("logger.project")
        if isinstance(p, str) and p:
            return p
    return "vicuna-exp"


def build_wandb_report(sweep: Sweep, fairness: Fairness, *, entity: str, project: str, group: str) -> Any:
    """A `wandb_workspaces` Report (not saved) with loss/eval_loss vs tokens and throughput."""
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces import expr

    name = str(sweep.meta.get("name") or sweep.root.resolve().name)
    runset = wr.Runset(
        entity=entity,
        project=project,
        name=f"sweep {name}",
        filters=expr.And(expr.Metric("Group") == group),
        visible_columns=[f"summary:{k}" for k in SUMMARY_KEYS],
    )
    panels = [
        wr.LinePlot(title="Training loss vs tokens seen", x=X_TOKENS, y=[LOSS], title_x="tokens seen",
                    title_y="training loss", legend_position="south"),
        wr.LinePlot(title="eval_loss (per supervised token) vs tokens seen", x=X_TOKENS, y=[EVAL_LOSS],
                    title_x="tokens seen", title_y="eval_loss", legend_position="south"),
        wr.BarPlot(title="Throughput (tokens/s, all ranks)", metrics=[TOKENS_PER_S], orientation="h"),
        wr.BarPlot(title="Best eval_loss", metrics=[wr.SummaryMetric("best_eval_loss")], orientation="h"),
    ]
    held = list(sweep.constant_overrides) + fairness.held
    blocks: list[Any] = [
        wr.P(f"Sweep {name}: {len(sweep.jobs)} jobs, wandb group {group}. "
             f"Swept axes: {', '.join(sweep.axes) or 'none'}."),
        wr.PanelGrid(runsets=[runset], panels=panels),
        wr.H2("What was held constant"),
        wr.UnorderedList(items=held or ["Nothing could be confirmed as constant."]),
        wr.H2("What could not be held constant"),
        wr.UnorderedList(items=fairness.caveats or ["No known confounders beyond the swept axes."]),
    ]
    return wr.Report(project=project, entity=entity, title=f"vicuna-exp sweep: {name}"[:128],
                     description=str(sweep.meta.get("description") or "")[:1000], blocks=blocks)


def default_entity() -> str:
    """The key owner's default entity; needs the network, so only called when publishing."""
    import wandb

    entity = wandb.Api().default_entity
    if not entity:
        raise RuntimeError("wandb has no default entity for this API key; pass --entity")
    return str(entity)


def publish(report: Any) -> str:
    report.save()
    return str(report.url)
