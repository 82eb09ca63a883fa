"""The report of a search: its trials sorted by the objective, the best parameters, and Optuna's
optimisation-history and parameter-importance plots (matplotlib, so the report stays offline).

Everything comes from `search.json` in the sweep dir (written by the sweeper after every batch),
not from the study's storage, so a copy of the sweep dir reports without its database.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from vicuna_exp.report.plots import Plot
from vicuna_exp.report.render import Block
from vicuna_exp.search import format_value


def ranked_trials(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Trials with a value first, best first; then the others by number."""
    valued = [t for t in record["trials"] if t.get("value") is not None]
    valued.sort(key=lambda t: (t["value"] if record["direction"] == "minimize" else -t["value"], t["number"]))
    return valued + sorted((t for t in record["trials"] if t.get("value") is None), key=lambda t: t["number"])


def search_blocks(record: dict[str, Any], out_dir: Path) -> tuple[list[Block], list[Plot]]:
    keys = list(record.get("space") or {})
    counts: dict[str, int] = {}
    for t in record["trials"]:
        counts[t["state"]] = counts.get(t["state"], 0) + 1
    blocks = [Block("h2", f"Search: study {record['study_name']}"),
              Block("p", f"{record['direction'].capitalize()} {record['objective']} (from each trial's summary.json) "
                         f"over {', '.join(f'{k} = {v}' for k, v in record['space'].items())}; "
                         f"{len(record['trials'])} trials ("
                         + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
                         + f") of n_trials {record['n_trials']}, stored in {record['storage']}.")]
    best = record.get("best")
    if best:
        blocks.append(Block("p", f"Best: trial {best['number']}, {record['objective']} {best['value']:.6g}, in "
                                 f"{best.get('run_dir') or '(no run dir)'}."))
        blocks.append(Block("bullets", items=[f"{k} = {format_value(v)}" for k, v in best["params"].items()]))
    else:
        blocks.append(Block("p", "No trial has completed with a value yet."))
    rows, sort_keys = [], []
    for rank, t in enumerate(ranked_trials(record), 1):
        has = t.get("value") is not None
        note = (f"interrupted; continued by trial {t['continued_by']}" if t.get("continued_by") is not None
                else t.get("error") or "")
        rows.append([str(rank) if has else "", str(t["number"]), t["state"],
                     f"{t['value']:.6g}" if has else "", *(format_value(t["params"][k]) if k in t["params"] else ""
                                                           for k in keys), t.get("run_dir") or "", note])
        sort_keys.append([rank if has else None, t["number"], t["state"], t.get("value"),
                          *(t["params"].get(k) for k in keys), t.get("run_dir"), note])
    blocks.append(Block("table", header=["rank", "trial", "state", record["objective"], *keys, "run dir", "note"],
                        rows=rows, sort_keys=sort_keys,
                        numeric=[True, True, False, True, *(True for _ in keys), False, False]))
    plots = write_search_plots(record, out_dir)
    for p in plots:
        blocks.append(Block("image", p.title, path=p.path) if p.path else
                      Block("p", f"{p.title}: not drawn ({p.why_missing})."))
    return blocks, plots


def in_memory_study(record: dict[str, Any]) -> Any:
    """The study rebuilt from search.json, for Optuna's plots."""
    import optuna
    from optuna.distributions import json_to_distribution
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = {k: json_to_distribution(v) for k, v in record["distributions"].items()}
    study = optuna.create_study(direction=record["direction"])
    for t in record["trials"]:
        params = {k: v for k, v in t["params"].items() if k in dists}
        if len(params) != len(dists) or t["state"] not in ("complete", "fail"):
            continue  # running or queued: not a result yet
        state = TrialState.COMPLETE if t.get("value") is not None else TrialState.FAIL
        study.add_trial(create_trial(params=params, distributions={k: dists[k] for k in params},
                                     value=t.get("value"), state=state))
    return study


def write_search_plots(record: dict[str, Any], out_dir: Path, prefix: str = "report_") -> list[Plot]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import plot_optimization_history, plot_param_importances

    study = in_memory_study(record)
    done = sum(1 for t in record["trials"] if t.get("value") is not None)
    out = []
    for name, title, draw, need in (
            ("optimization_history", "Optimisation history", plot_optimization_history, 1),
            ("param_importances", "Parameter importances", plot_param_importances, 2)):
        path = out_dir / f"{prefix}{name}.png"
        if done < need:
            out.append(Plot(name, title, None, f"needs {need} completed trial{'s' if need > 1 else ''}, has {done}"))
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                ax = draw(study)
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(7, 4)
            fig.tight_layout()
            fig.savefig(path, dpi=100)
            plt.close(fig)
            out.append(Plot(name, title, path))
        except Exception as e:  # noqa: BLE001 - a plot Optuna cannot draw must not sink the report
            out.append(Plot(name, title, None, f"{type(e).__name__}: {e}"))
    return out
