"""`vicuna-exp sweep NAME [overrides]`: run a named ablation from `sweeps/` as a Hydra multirun.

A sweep file holds the swept axes and the fixed settings; extra overrides on the command line
win over both (a comma list sweeps too). Jobs land in `outputs/sweeps/NAME/<axis values>/`, a
fixed place, so running the sweep again skips jobs already completed with the same config hash
and resumes interrupted ones. Each job leaves `sweep_job.json` beside its run dir (the outcome as
the sweep saw it, even when the job failed before training started); the parent gathers them
into `sweep.json` at the sweep root. Exit code: 0 when every job completed (now or earlier), else 1.
A file with `search:` (a space) instead of `axes:` is an Optuna study: `vicuna_exp.sweep_search`.
A sweep whose settings are not a product of axes names its arms instead (`arms:`, see `load_arms`):
each arm is its own multirun into `arm=NAME/` of the same sweep dir, gathered into one sweep.json.

    vicuna-exp sweep context_length
    vicuna-exp sweep context_length experiment=vicuna-7b model.path=/path/to/llama-7b-hf
    vicuna-exp sweep backend hydra/launcher=joblib hydra.launcher.n_jobs=2
    vicuna-exp sweep lr_search trainer.max_steps=20                 # a search: 8 trials of a study
    vicuna-exp sweep finetune_method trainer.max_steps=8            # named arms: full, LoRA r=8, r=64
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from vicuna_exp.choices import ResumeMode
from vicuna_exp.config import JOB_DIRNAME_RESOLVER, job_dirname  # noqa: F401 - job_dirname: re-exported
from vicuna_exp.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, UsageError

log = logging.getLogger(__name__)

JOB_RECORD = "sweep_job.json"
SWEEP_RECORD = "sweep.json"
_RUN_ENV = "VICUNA_EXP_SWEEP_RUN"  # set in every job by Hydra (hydra.job.env_set): which invocation ran it
_SPEC_KEYS = {"description", "axes", "arms", "fixed", "held_constant"}
_SEARCH_KEYS = {"search", "n_trials", "objective", "direction"}  # a search (vicuna_exp.sweep_search) instead of axes
ARM_KEY = "arm"  # how sweep.json, job dirs and reports name the arm of a sweep with `arms`

@dataclass
class SweepSpec:
    name: str
    path: Path
    description: str = ""
    axes: dict[str, list[str]] = field(default_factory=dict)
    fixed: list[str] = field(default_factory=list)
    held_constant: list[str] = field(default_factory=list)
    search: dict[str, str] = field(default_factory=dict)  # key -> sweep function (`interval(0, 0.1)`)
    n_trials: int | None = None
    objective: str | None = None
    direction: str | None = None
    # Named arms, each a list of overrides, for settings that are not a product of axes (`load_arms`);
    # crossed with `axes` when both are given.
    arms: dict[str, list[str]] = field(default_factory=dict)

def sweeps_dir() -> Path:
    """`sweeps/` beside `conf/` in a checkout, or shipped inside the package."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "sweeps", here / "sweeps"):
        if candidate.is_dir():
            return candidate
    raise UsageError(f"sweeps/ not found next to {here}")

def available_sweeps() -> list[str]:
    return sorted(p.stem for p in sweeps_dir().glob("*.yaml"))

def load_spec(name: str) -> SweepSpec:
    """A sweep by name (`sweeps/NAME.yaml`) or by path to a YAML file of the same shape."""
    import yaml

    path = Path(name)
    if not (name.endswith((".yaml", ".yml")) and path.is_file()):
        path = sweeps_dir() / f"{name}.yaml"
        if not path.is_file():
            raise UsageError(f"unknown sweep {name!r}; available sweeps: {', '.join(available_sweeps())}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UsageError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: must be a mapping with keys {', '.join(sorted(_SPEC_KEYS))}")
    unknown = set(raw) - _SPEC_KEYS - _SEARCH_KEYS
    if unknown:
        valid = ", ".join(sorted(_SPEC_KEYS | _SEARCH_KEYS))
        raise UsageError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; valid: {valid}")
    searched = load_search_keys(path, raw)
    axes = raw.get("axes") or {}
    arms = load_arms(path, raw.get("arms"))
    if searched and (axes or arms):
        raise UsageError(f"{path}: `axes` or `arms` (a grid) and `search` (a study) exclude each other; keep one")
    if not searched and (not isinstance(axes, dict) or not (axes or arms)):
        raise UsageError(f"{path}: `axes` must map an override key to a list of values, e.g. context: [512, 2048]")
    for key, values in axes.items():
        if not isinstance(values, list) or not values or any(isinstance(v, (dict, list)) for v in values):
            raise UsageError(f"{path}: axes.{key} must be a non-empty list of plain values")
    fixed = raw.get("fixed") or []
    if not isinstance(fixed, list) or any(not isinstance(f, str) or "=" not in f for f in fixed):
        raise UsageError(f"{path}: `fixed` must be a list of overrides `key=value`")
    held = raw.get("held_constant") or []
    return SweepSpec(
        name=path.stem, path=path, description=str(raw.get("description") or "").strip(),
        axes={str(k): [_value(v) for v in vs] for k, vs in axes.items()},
        fixed=list(fixed), held_constant=[str(h) for h in held] if isinstance(held, list) else [str(held)],
        **searched,
        arms=arms,
    )

def load_search_keys(path: Path, raw: dict[str, Any]) -> dict[str, Any]:
    """The search keys of a spec (`search`, `n_trials`, `objective`, `direction`), checked; {} for a grid."""
    if not set(raw) & _SEARCH_KEYS:
        return {}
    space = raw.get("search")
    if not isinstance(space, dict) or not space or any(not isinstance(v, str) for v in space.values()):
        raise UsageError(f"{path}: `search` must map an override key to a sweep function, "
                         "e.g. optim.lr: tag(log, interval(1e-5, 1e-3))")
    n_trials = raw.get("n_trials")
    if n_trials is not None and (isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1):
        raise UsageError(f"{path}: `n_trials` must be a positive integer")
    direction = raw.get("direction")
    if direction is not None and direction not in ("minimize", "maximize"):
        raise UsageError(f"{path}: `direction` must be minimize or maximize")
    objective = raw.get("objective")
    if objective is not None and not isinstance(objective, str):
        raise UsageError(f"{path}: `objective` must name a key of summary.json")
    return {"search": {str(k): v for k, v in space.items()}, "n_trials": n_trials, "objective": objective,
            "direction": direction}

def _value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)

# ---------------------------------------------------------------- planning

def _key(override: str) -> str:
    return override.partition("=")[0].strip().lstrip("+~")

@dataclass
class Plan:
    spec: SweepSpec
    sweep_dir: Path
    group: str
    run_id: str
    app_overrides: list[str]  # what Hydra sweeps: axes, then fixed, then the user's
    hydra_overrides: list[str]
    jobs: list[list[str]]  # each job's task overrides, exactly as Hydra will pass them
    name_keys: list[str]  # the keys that name a job's dir
    arms: list[Plan] = field(default_factory=list)  # a sweep with `arms`: one multirun per arm (`plan_arm_sweep`)
    arm: str | None = None  # the arm this plan runs, in an arm's own plan

def plan_sweep(spec: SweepSpec, overrides: list[str]) -> Plan:
    from vicuna_exp.hydra_app import expand_sweep, quote_numeric_choices

    if spec.search:
        raise UsageError(f"{spec.path}: a search (`search:`), not a grid; `vicuna-exp sweep {spec.name}` runs it")
    if spec.arms:
        return plan_arm_sweep(spec, overrides)

    user_hydra = [o for o in overrides if _key(o).startswith(("hydra.", "hydra/")) or o.startswith("-")]
    user_app = [o for o in overrides if o not in user_hydra]
    bad_flags = [o for o in user_hydra if o.startswith("-")]
    if bad_flags:
        raise UsageError(f"vicuna-exp sweep takes overrides only, not {' '.join(bad_flags)} (it is always a multirun)")

    merged: dict[str, str] = {}
    for k, values in spec.axes.items():
        merged[k] = f"{k}={','.join(values)}"
    for f in spec.fixed:
        merged[_key(f)] = f
    for o in user_app:
        merged[_key(o)] = o  # the command line wins over the sweep file
    # One wandb group per sweep definition: the same sweep run again lands in the same group.
    definition = json.dumps({"axes": spec.axes, "fixed": spec.fixed, "user": sorted(user_app)}, sort_keys=True)
    if "logger.group" not in merged:
        merged["logger.group"] = f"logger.group={spec.name}-{hashlib.sha256(definition.encode()).hexdigest()[:6]}"
    group = merged["logger.group"].partition("=")[2]
    app = quote_numeric_choices(list(merged.values()))
    jobs = expand_sweep(app)

    name_keys = [k for k in merged if k in spec.axes or len({_job_value(j, k) for j in jobs}) > 1]
    excluded = sorted(set(_conf_excluded_keys()) | {k for k in merged if k not in name_keys})

    sweep_dir = Path(next((o.partition("=")[2] for o in user_hydra if _key(o) == "hydra.sweep.dir"),
                          f"outputs/sweeps/{spec.name}"))
    run_id = uuid.uuid4().hex[:12]
    hydra = [
        f"hydra.sweep.dir={sweep_dir}",
        f"hydra.sweep.subdir='${{{JOB_DIRNAME_RESOLVER}:${{hydra.job.override_dirname}}}}'",
        f"hydra.job.config.override_dirname.exclude_keys=[{','.join(excluded)}]",
        f"++hydra.job.env_set.{_RUN_ENV}={run_id}",
    ]
    hydra += [o for o in user_hydra if _key(o) != "hydra.sweep.dir"]
    return Plan(spec=spec, sweep_dir=sweep_dir, group=group, run_id=run_id, app_overrides=app,
                hydra_overrides=hydra, jobs=jobs, name_keys=name_keys)

def _job_value(job: list[str], key: str) -> str | None:
    return next((o.partition("=")[2] for o in job if _key(o) == key), None)

def _conf_excluded_keys() -> list[str]:
    """Keys the primary config already leaves out of job dir names (logger, resume, ...)."""
    import yaml

    from vicuna_exp.config import conf_dir

    cfg = yaml.safe_load((conf_dir() / "config.yaml").read_text()) or {}
    node: Any = cfg
    for part in ("hydra", "job", "config", "override_dirname", "exclude_keys"):
        node = node.get(part) if isinstance(node, dict) else None
    return [str(k) for k in node] if isinstance(node, list) else []

def check_compose(plan: Plan) -> None:
    """Compose every job before any runs, so a typo stops the sweep with one line (exit 2)."""
    from vicuna_exp.hydra_app import compose, explain_config_error

    for i, job in enumerate(plan.jobs):
        try:  # the first job with the hydra overrides too: a bad launcher option also stops here
            compose(job + plan.hydra_overrides if i == 0 else job, return_hydra_config=i == 0)
        except UsageError:
            raise
        except Exception as e:  # noqa: BLE001
            raise UsageError(f"job {' '.join(job)}: {explain_config_error(e)}") from None

# ---------------------------------------------------------------- one job (inside Hydra)

def run_sweep_job(cfg: DictConfig) -> int:
    """One job, under any Hydra launcher: skip it if completed with this config, else train it
    (train resumes an interrupted run), and record the outcome in the job dir. Never raises, so
    one failing job cannot stop the others."""
    from hydra.core.hydra_config import HydraConfig

    from vicuna_exp import job
    from vicuna_exp.config import config_hash, with_lr_in_force
    from vicuna_exp.rundir import completed_summary

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    record: dict[str, Any] = {"run": os.environ.get(_RUN_ENV), "overrides": list(hc.overrides.task),
                              "run_dir": str(run_dir), "started_at": time.time(), "pid": os.getpid()}
    code, error, outcome = EXIT_FAILED, None, "ran"
    try:
        with_lr_in_force(cfg, list(hc.overrides.task))  # as `vicuna-exp train` does: a method's own lr
        chash = config_hash(cfg)
        record["config_hash"] = chash
        if cfg.trainer.resume == ResumeMode.auto and completed_summary(run_dir, chash) is not None:
            code, outcome = EXIT_OK, "skipped"
            print(f"[sweep] {run_dir.name}: completed earlier with the same config; skipped")
        else:
            code = int(job.main(cfg) or EXIT_OK)  # validates the config itself
    except UsageError as e:
        code, error = EXIT_USAGE, str(e)
    except Exception as e:  # noqa: BLE001 - recorded as this job's failure; the sweep goes on
        code, error = EXIT_FAILED, f"{type(e).__name__}: {e}"
        log.error("sweep job %s failed:\n%s", run_dir.name, traceback.format_exc())
    if error:
        print(f"[sweep] {run_dir.name}: failed: {error}", file=sys.stderr)
    record.update(outcome=outcome, exit_code=code, error=error, finished_at=time.time())
    _write_json(run_dir / JOB_RECORD, record)
    return code

# ---------------------------------------------------------------- the whole sweep

def run_multirun(plan: Plan) -> None:
    """Hand the planned overrides to Hydra as a multirun over `conf/` (any launcher)."""
    import hydra

    from vicuna_exp.config import conf_dir, register_configs

    if plan.arms:
        for arm in plan.arms:
            run_multirun(arm)
        return
    register_configs()
    app = hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")(run_sweep_job)
    saved = sys.argv
    sys.argv = ["vicuna-exp sweep", "-m", *plan.app_overrides, *plan.hydra_overrides]
    try:
        app()
    except SystemExit as e:  # Hydra exits for errors of its own (composition, launcher)
        if e.code not in (0, None):
            log.error("Hydra stopped the sweep (exit %s)", e.code)
    finally:
        sys.argv = saved

def gather(plan: Plan, started_at: float, finished_at: float) -> dict[str, Any]:
    """sweep.json: every planned job with its dir, overrides and status as this run left it."""
    records: dict[tuple[str, ...], tuple[Path, dict[str, Any]]] = {}
    if plan.sweep_dir.is_dir():
        for f in plan.sweep_dir.rglob(JOB_RECORD):
            try:
                rec = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(rec, dict) and rec.get("run") == plan.run_id:
                records[tuple(rec.get("overrides") or [])] = (f.parent, rec)
    jobs = []
    for overrides in plan.jobs:
        found = records.get(tuple(overrides))
        entry: dict[str, Any] = {"overrides": overrides}
        if found is None:
            entry.update(name=None, status="interrupted", exit_code=None,
                         error="did not run: the sweep stopped before this job; run the sweep again")
        else:
            job_dir, rec = found
            entry.update(name=job_dir.relative_to(plan.sweep_dir).as_posix(), exit_code=rec.get("exit_code"),
                         config_hash=rec.get("config_hash"), wall_s=_wall(rec))
            entry.update(_status(job_dir, rec))
        jobs.append(entry)
    result = {
        "name": plan.spec.name, "description": plan.spec.description, "sweep_file": str(plan.spec.path),
        "group": plan.group, "run_id": plan.run_id, "sweep_dir": str(plan.sweep_dir),
        "axes": {k: _axis_values(plan, k) for k in plan.name_keys},
        "fixed": plan.spec.fixed, "held_constant": plan.spec.held_constant,
        "overrides": plan.app_overrides, "hydra_overrides": plan.hydra_overrides,
        "started_at": started_at, "finished_at": finished_at, "jobs": jobs,
    }
    return with_arms(plan, result) if plan.arms else result

def _axis_values(plan: Plan, key: str) -> list[str]:
    out: list[str] = []
    for j in plan.jobs:
        v = _job_value(j, key)
        if v is not None and v.strip("'\"") not in out:
            out.append(v.strip("'\""))
    return out

def _wall(rec: dict[str, Any]) -> float | None:
    a, b = rec.get("started_at"), rec.get("finished_at")
    return round(b - a, 3) if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None

def _status(job_dir: Path, rec: dict[str, Any]) -> dict[str, Any]:
    if rec.get("outcome") == "skipped":
        return {"status": "skipped", "error": None}
    try:
        summary = json.loads((job_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = None
    code = rec.get("exit_code")
    if isinstance(summary, dict) and summary.get("status") in ("completed", "failed", "interrupted"):
        status = summary["status"]
        if status == "completed" and code != EXIT_OK:
            status = "failed"  # trained, then failed afterwards (e.g. writing final/)
        return {"status": status, "error": summary.get("error") or rec.get("error")}
    if code == EXIT_INTERRUPTED:
        return {"status": "interrupted", "error": rec.get("error")}
    return {"status": "failed", "error": rec.get("error") or f"exit code {code}, no summary.json"}

def run_sweep(spec: SweepSpec, overrides: list[str]) -> tuple[int, dict[str, Any]]:
    plan = plan_sweep(spec, overrides)
    check_compose(plan)
    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    print(f"sweep {spec.name}: {len(plan.jobs)} jobs into {plan.sweep_dir} (wandb group {plan.group})")
    started = time.time()
    try:
        run_multirun(plan)
    finally:  # Ctrl-C included: record what ran, so a rerun knows what is left
        result = gather(plan, started, time.time())
        _write_json(plan.sweep_dir / SWEEP_RECORD, result)
    done = all(j["status"] in ("completed", "skipped") for j in result["jobs"])
    return (EXIT_OK if done else EXIT_FAILED), result

# ---------------------------------------------------------------- arms: sweeps that are not a product

_ARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


def load_arms(path: Path, raw: Any) -> dict[str, list[str]]:
    """`arms:` of a sweep file: arm name -> its overrides (`lora_r8: [finetune=lora, finetune.r=8]`).
    Each arm is one point, so its overrides must not sweep; two arms must differ. UsageError (exit 2)
    names the arm at fault."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not raw:
        raise UsageError(f"{path}: `arms` must map an arm name to a list of overrides, "
                         "e.g. lora_r8: [finetune=lora, finetune.r=8]")
    from vicuna_exp.hydra_app import expand_sweep

    arms: dict[str, list[str]] = {}
    for name, overrides in raw.items():
        name = str(name)
        if not _ARM_NAME.fullmatch(name):
            raise UsageError(f"{path}: arms.{name}: an arm name is letters, digits, '_', '.' or '-' (it names a job dir)")
        if overrides is None:
            overrides = []
        if not isinstance(overrides, list) or any(not isinstance(o, str) or "=" not in o for o in overrides):
            raise UsageError(f"{path}: arms.{name} must be a list of overrides `key=value`")
        keys = [_key(o) for o in overrides]
        if len(set(keys)) != len(keys):
            raise UsageError(f"{path}: arms.{name} sets {', '.join(sorted({k for k in keys if keys.count(k) > 1}))} twice")
        if overrides and len(expand_sweep(overrides)) != 1:
            raise UsageError(f"{path}: arms.{name} sweeps ({', '.join(overrides)}); an arm is one point: "
                             "put a swept key under `axes`")
        arms[name] = list(overrides)
    seen: dict[tuple[str, ...], str] = {}
    for name, overrides in arms.items():
        same = seen.setdefault(tuple(sorted(overrides)), name)
        if same != name:
            raise UsageError(f"{path}: arms.{name} and arms.{same} have the same overrides")
    return arms


def plan_arm_sweep(spec: SweepSpec, overrides: list[str]) -> Plan:
    """A sweep with `arms`: each arm's overrides (crossed with the axes) are planned as their own
    multirun into `arm=NAME[,<axis values>]/` of the one sweep dir, sharing the run id and wandb
    group, so skip-completed, sweep.json and the report work as for a product sweep."""
    if set(spec.axes) & {_key(o) for arm in spec.arms.values() for o in arm}:
        raise UsageError(f"{spec.path}: a key is both an axis and set by an arm: "
                         f"{', '.join(sorted(set(spec.axes) & {_key(o) for a in spec.arms.values() for o in a}))}")
    definition = json.dumps({"arms": spec.arms, "axes": spec.axes, "fixed": spec.fixed,
                             "user": sorted(o for o in overrides if not _key(o).startswith("hydra"))}, sort_keys=True)
    group = f"logger.group={spec.name}-{hashlib.sha256(definition.encode()).hexdigest()[:6]}"
    run_id = uuid.uuid4().hex[:12]
    arm_plans = []
    for name, arm_overrides in spec.arms.items():
        point = SweepSpec(name=spec.name, path=spec.path, description=spec.description, axes=spec.axes,
                          fixed=[*arm_overrides, *spec.fixed], held_constant=spec.held_constant)
        arm_plan = plan_sweep(point, [group, *overrides])  # the arm's point as fixed settings; the user's win
        arm_plan.arm, arm_plan.run_id = name, run_id
        arm_plans.append(arm_plan)
    arm_keys = {_key(o) for arm in spec.arms.values() for o in arm}
    jobs = [job for p in arm_plans for job in p.jobs]
    name_keys = [k for k in dict.fromkeys(k for p in arm_plans for k in p.name_keys) if k not in arm_keys]
    for p in arm_plans:
        p.name_keys = name_keys
        p.hydra_overrides = [_arm_subdir(o, p.arm, name_keys, arm_keys) for o in p.hydra_overrides]
        p.hydra_overrides = [f"++hydra.job.env_set.{_RUN_ENV}={run_id}" if _key(o) == f"hydra.job.env_set.{_RUN_ENV}"
                             else o for o in p.hydra_overrides]
    first = arm_plans[0]
    return Plan(spec=spec, sweep_dir=first.sweep_dir, group=first.group, run_id=run_id,
                app_overrides=[o for o in first.app_overrides if _key(o) not in arm_keys],
                hydra_overrides=first.hydra_overrides, jobs=jobs, name_keys=name_keys, arms=arm_plans)


def _arm_subdir(override: str, arm: str | None, name_keys: list[str], arm_keys: set[str]) -> str:
    """An arm's job dir is `arm=NAME`, then the values of the other named keys (if any); the arm's
    own keys never name the dir (its name does)."""
    key = _key(override)
    if key == "hydra.sweep.subdir":
        rest = f",${{{JOB_DIRNAME_RESOLVER}:${{hydra.job.override_dirname}}}}" if name_keys else ""
        return f"hydra.sweep.subdir='{ARM_KEY}={arm}{rest}'"
    if key == "hydra.job.config.override_dirname.exclude_keys":
        excluded = set(override.partition("=")[2].strip("[]").split(",")) | arm_keys
        return f"{key}=[{','.join(sorted(k for k in excluded if k))}]"
    return override


def job_arms(plan: Plan) -> list[str | None]:
    """The arm of each of `plan.jobs` (None throughout for a sweep without arms)."""
    by_job = {tuple(job): p.arm for p in plan.arms for job in p.jobs}
    return [by_job.get(tuple(job)) for job in plan.jobs]


def with_arms(plan: Plan, result: dict[str, Any]) -> dict[str, Any]:
    """sweep.json of a sweep with arms: the arms' overrides, `arm` first among the axes, and each
    job's arm."""
    for entry, arm in zip(result["jobs"], job_arms(plan), strict=True):
        entry[ARM_KEY] = arm
    result["axes"] = {ARM_KEY: list(plan.spec.arms), **{k: _axis_values(plan, k) for k in plan.name_keys}}
    result["arms"] = plan.spec.arms
    return result


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        try:
            print("\navailable sweeps: " + ", ".join(available_sweeps()))
        except UsageError as e:
            print(f"\n{e}")
        return EXIT_OK if argv else EXIT_USAGE
    try:
        spec = load_spec(argv[0])
        code, result = run_sweep(spec, argv[1:])
    except UsageError as e:
        print(f"vicuna-exp sweep: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    width = max((len(j["name"] or "") for j in result["jobs"]), default=10)
    print(f"\nsweep {spec.name}: " + ", ".join(f"{n} {s}" for s, n in _tally(result["jobs"]).items()))
    for j in result["jobs"]:
        name = j["name"] or " ".join(j["overrides"])
        line = f"  {name:<{width}}  {j['status']}"
        print(line + (f"  ({_first_line(j['error'])})" if j.get("error") and j["status"] != "completed" else ""))
    print(f"wrote {result['sweep_dir']}/{SWEEP_RECORD}; compare with: vicuna-exp report {result['sweep_dir']}")
    return code

def _tally(jobs: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for j in jobs:
        out[j["status"]] = out.get(j["status"], 0) + 1
    return out

def _first_line(text: str) -> str:
    lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""

def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic: a reader (or a killed sweep) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
