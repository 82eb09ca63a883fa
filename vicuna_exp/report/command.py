"""`vicuna-exp report SWEEP_DIR [--out DIR] [--wandb]`: the comparison of a sweep's jobs.

Reads only the run dirs, so it works offline, on a copy of the outputs, and long after the runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from vicuna_exp.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, UsageError
from vicuna_exp.report.collect import Sweep, load_sweep
from vicuna_exp.search import read_record


def add_eval_summaries(sweep: Sweep) -> None:
    """Eval results as extra columns, for jobs that have been evaluated (`RUN_DIR/eval/`)."""
    evaluated = [j for j in sweep.jobs if j.path is not None and (j.path / "eval").is_dir()]
    if not evaluated:
        return
    try:
        from vicuna_exp.eval.report import summarize_run_eval
    except ImportError as e:
        sweep.warnings.append(f"eval results present but not summarised: vicuna_exp.eval.report unavailable ({e})")
        return
    for j in evaluated:
        try:
            summary = summarize_run_eval(j.path)
        except Exception as e:  # noqa: BLE001 - one bad eval dir must not sink the report
            j.notes.append(f"eval/ unreadable ({type(e).__name__}: {e})")
            continue
        if isinstance(summary, dict):
            j.eval_summary = {str(k): v for k, v in summary.items() if not isinstance(v, (dict, list))}


def write_report(sweep_dir: Path, out_dir: Path | None = None, quiet: bool = False) -> tuple[Sweep, list[Path]]:
    """Everything but wandb: read the sweep, write report.md, report.html and PNGs, print the table."""
    from vicuna_exp.report.compare import assess_fairness, build_table
    from vicuna_exp.report.plots import write_plots
    from vicuna_exp.report.render import build_document, print_console, to_html, to_markdown

    if not sweep_dir.is_dir():
        raise UsageError(f"SWEEP_DIR {sweep_dir}: not a directory")
    sweep = load_sweep(sweep_dir)
    if not sweep.jobs:
        raise UsageError(f"SWEEP_DIR {sweep_dir}: no job dirs found (a job dir holds summary.json, "
                         "metrics.jsonl or .hydra/) and no sweep.json listing jobs")
    add_eval_summaries(sweep)
    out = out_dir or sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    table = build_table(sweep)
    fairness = assess_fairness(sweep)
    plots = write_plots(sweep, out)
    doc = build_document(sweep, table, fairness, plots)
    record = read_record(sweep_dir)
    if record is not None:  # a search: its trials, best point and Optuna's plots, after the results table
        from vicuna_exp.report.search import search_blocks

        blocks, search_plots = search_blocks(record, out)
        at = next((i + 1 for i, b in enumerate(doc) if b.kind == "table"), len(doc))
        doc[at:at] = blocks
        plots += search_plots
    md, page = out / "report.md", out / "report.html"
    md.write_text(to_markdown(doc, out))
    page.write_text(to_html(doc))
    written = [md, page] + [p.path for p in plots if p.path is not None]
    if not quiet:
        print_console(sweep, table, fairness, written)
    return sweep, written


def publish_wandb(sweep: Sweep, entity: str | None, project: str | None) -> str:
    from vicuna_exp.report.compare import assess_fairness
    from vicuna_exp.report.wandb_report import (
        build_wandb_report,
        default_entity,
        publish,
        sweep_group,
        sweep_project,
    )
    from vicuna_exp.tracking import wandb_key_configured

    if not wandb_key_configured():
        raise UsageError("--wandb needs a wandb API key: set WANDB_API_KEY or run `wandb login` "
                         "(report.md and report.html were written without it)")
    entity = entity or os.environ.get("WANDB_ENTITY") or _config_value(sweep, "logger.entity") or default_entity()
    report = build_wandb_report(sweep, assess_fairness(sweep), entity=entity,
                                project=project or sweep_project(sweep), group=sweep_group(sweep))
    return publish(report)


def _config_value(sweep: Sweep, key: str) -> str | None:
    for j in sweep.jobs:
        v = j.config.get(key)
        if isinstance(v, str) and v:
            return v
    return None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="vicuna-exp report",
        description="Compare the jobs of a sweep (or any dir of run dirs): a table on the console, "
                    "report.md, report.html (self-contained) and PNG plots.")
    parser.add_argument("sweep_dir", type=Path, metavar="SWEEP_DIR")
    parser.add_argument("--out", type=Path, default=None, help="where to write the report (default: SWEEP_DIR)")
    parser.add_argument("--wandb", action="store_true",
                        help="also create a wandb Report for the sweep's group (needs an API key)")
    parser.add_argument("--entity", help="wandb entity of the Report (default: WANDB_ENTITY, logger.entity, "
                                         "or the key's default entity)")
    parser.add_argument("--project", help="wandb project of the Report (default: the jobs' logger.project)")
    args = parser.parse_args(argv)
    try:
        sweep, _ = write_report(args.sweep_dir, args.out)
        if args.wandb:
            try:
                url = publish_wandb(sweep, args.entity, args.project)
            except UsageError:
                raise
            except Exception as e:  # noqa: BLE001 - network/auth failures: say so, keep the local report
                print(f"vicuna-exp report: error: wandb Report not created: {type(e).__name__}: {e}", file=sys.stderr)
                return EXIT_FAILED
            print(f"wandb Report: {url}")
    except UsageError as e:
        print(f"vicuna-exp report: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK
