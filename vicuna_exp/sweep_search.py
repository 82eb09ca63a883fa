"""`vicuna-exp sweep NAME` for a spec with `search:`: an Optuna study in `outputs/sweeps/NAME/`.

The spec's space, `n_trials`, `objective` and `direction` become `hydra/sweeper=optuna` settings
(the command line wins over them), and each trial is a sweep job (`sweep.run_sweep_job`: skipped
when completed with the same config, resumed when interrupted). Running the command again continues
the study. Exit code: 0 when no trial of the study failed (now or earlier), 75 when one was interrupted
(run it again), 2 for a bad spec, space or objective, else 1.

    vicuna-exp sweep lr_search
    vicuna-exp sweep lr_search hydra.sweeper.n_trials=40 hydra/launcher=joblib hydra.sweeper.n_jobs=2
"""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path
from typing import Any

from vicuna_exp import search, sweep
from vicuna_exp.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, UsageError
from vicuna_exp.sweep import _RUN_ENV, SWEEP_RECORD, SweepSpec, _write_json, run_sweep_job

_STATUS = {"complete": "completed", "fail": "failed", "running": "running", "waiting": "waiting",
           "pruned": "failed"}


def search_overrides(spec: SweepSpec, overrides: list[str]) -> tuple[list[str], list[str], Path]:
    """(task overrides, Hydra overrides, sweep dir): the spec's space and fixed settings, then the
    user's, each key once (the command line wins)."""
    user_hydra = [o for o in overrides if search.override_key(o).startswith(("hydra.", "hydra/")) or o.startswith("-")]
    if any(o.startswith("-") for o in user_hydra):
        raise UsageError("vicuna-exp sweep takes overrides only (it is always a multirun)")
    app: dict[str, str] = {k: f"{k}={v}" for k, v in spec.search.items()}
    for o in [*spec.fixed, *(o for o in overrides if o not in user_hydra)]:
        app[search.override_key(o)] = o
    hydra: dict[str, str] = {"hydra/sweeper": "hydra/sweeper=optuna",
                             "hydra.sweep.dir": f"hydra.sweep.dir=outputs/sweeps/{spec.name}",
                             "hydra.sweeper.study_name": f"hydra.sweeper.study_name={spec.name}"}
    for key, value in (("n_trials", spec.n_trials), ("objective", spec.objective), ("direction", spec.direction)):
        if value is not None:
            hydra[f"hydra.sweeper.{key}"] = f"hydra.sweeper.{key}={value}"
    for o in user_hydra:
        hydra[search.override_key(o)] = o
    sweep_dir = Path(hydra["hydra.sweep.dir"].partition("=")[2])
    return list(app.values()), list(hydra.values()), sweep_dir


def check_compose(app: list[str], hydra: list[str]) -> None:
    """One point of the space with everything fixed, composed before any trial (exit 2 on a bad key)."""
    from vicuna_exp.hydra_app import compose, explain_config_error

    space, fixed = search.parse_space(app)
    try:
        compose(fixed + search.trial_overrides(search.sample_point(space)) + hydra, return_hydra_config=True)
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"search {' '.join(app)}: {explain_config_error(e)}") from None


def run_hydra(app: list[str], hydra_overrides: list[str]) -> int:
    """The study as a Hydra multirun of sweep jobs; the sweeper's own exit code (2, 75) comes back."""
    import hydra

    from vicuna_exp.config import conf_dir
    from vicuna_exp.hydra_app import quote_numeric_choices, register_all

    register_all()
    task = hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")(run_sweep_job)
    saved = sys.argv
    sys.argv = ["vicuna-exp sweep", "-m", *quote_numeric_choices(app), *hydra_overrides]
    try:
        task()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_FAILED
    finally:
        sys.argv = saved
    return EXIT_OK


def sweep_record(spec: SweepSpec, record: dict[str, Any] | None, sweep_dir: Path, run_id: str,
                 started_at: float) -> dict[str, Any]:
    """sweep.json for a search: the spec's words and one job per trial, as the report reads a grid's."""
    jobs = []
    for t in (record or {}).get("trials", []):
        status = "interrupted" if t["state"] == "fail" and _continued(record, t["number"]) else \
            _STATUS.get(t["state"], t["state"])
        jobs.append({"name": t.get("run_dir"), "trial": t["number"], "status": status, "value": t.get("value"),
                     "params": t.get("params"), "error": t.get("error"),
                     "overrides": search.trial_overrides(t.get("params") or {})})
    return {"name": spec.name, "description": spec.description, "sweep_file": str(spec.path),
            "run_id": run_id, "sweep_dir": str(sweep_dir), "search": spec.search,
            "fixed": spec.fixed, "held_constant": spec.held_constant, "started_at": started_at,
            "finished_at": time.time(), "jobs": jobs}


def _continued(record: dict[str, Any] | None, number: int) -> bool:
    return any(t.get("resumes") == number for t in (record or {}).get("trials", []))


def run_search(spec: SweepSpec, overrides: list[str]) -> int:
    app, hydra_overrides, sweep_dir = search_overrides(spec, overrides)
    run_id = uuid.uuid4().hex[:12]
    hydra_overrides.append(f"++hydra.job.env_set.{_RUN_ENV}={run_id}")
    try:
        check_compose(app, hydra_overrides)
    except UsageError as e:
        print(f"vicuna-exp sweep: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    sweep_dir.mkdir(parents=True, exist_ok=True)
    print(f"search {spec.name}: a study of {len(spec.search)} parameters into {sweep_dir}")
    started = time.time()
    code = EXIT_FAILED
    try:
        code = run_hydra(app, hydra_overrides)
    finally:  # Ctrl-C included: the trials so far are written down
        record = search.read_record(sweep_dir)
        if record is not None:
            _write_json(sweep_dir / SWEEP_RECORD, sweep_record(spec, record, sweep_dir, run_id, started))
    if record is None:
        return code if code != EXIT_OK else EXIT_FAILED
    _print_trials(spec, record)
    print(f"wrote {sweep_dir}/{search.SEARCH_RECORD}; report with: vicuna-exp report {sweep_dir}")
    if code != EXIT_OK:
        return code
    # Trials still running belong to another invocation of the same study: not failures of this one.
    counted = [t for t in record["trials"] if not _continued(record, t["number"])]
    return EXIT_FAILED if any(t["state"] == "fail" for t in counted) else EXIT_OK


def _print_trials(spec: SweepSpec, record: dict[str, Any]) -> None:
    done = sorted((t for t in record["trials"] if t["value"] is not None), key=lambda t: t["value"],
                  reverse=record["direction"] == "maximize")
    others = [t for t in record["trials"] if t["value"] is None]
    print(f"\nsearch {spec.name}: {len(done)} trials with a value, {len(others)} without "
          f"({record['objective']}, {record['direction']})")
    for t in done + others:
        value = f"{t['value']:.6g}" if t["value"] is not None else t["state"]
        note = f"  (interrupted; continued by #{t['continued_by']})" if t.get("continued_by") is not None else ""
        print(f"  #{t['number']:<3} {value:>10}  {', '.join(search.trial_overrides(t['params']))}{note}")


def main(argv: list[str]) -> int:
    """`vicuna-exp sweep NAME`: a spec with `search:` runs here; a grid (and `--help`) in `vicuna_exp.sweep`."""
    if not argv or argv[0].startswith("-"):
        return sweep.main(argv)
    try:
        spec = sweep.load_spec(argv[0])
    except UsageError as e:
        print(f"vicuna-exp sweep: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return run_search(spec, argv[1:]) if spec.search else sweep.main(argv)
