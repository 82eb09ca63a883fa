"""An Optuna study over the recipe: its search space, storage, proposals and results.

The space is written in Hydra's override grammar (`optim.lr=tag(log, interval(1e-5, 1e-3))`,
`interval(a, b)`, `choice(...)`, `range(...)`, or a comma list). The study lives in the sweep dir,
in Optuna's journal file (safe for several writers on one machine; an RDB URL in `storage` is the
choice across nodes). `n_trials` is the study's total over every invocation.

Reruns are deterministic: each fresh proposal is drawn by a sampler seeded with `seed + k`, where k
counts the study's trials before it, so the same seed, `n_trials` and `n_jobs=1` propose the same
points, provided the objective itself is deterministic (the same config trains to the same loss).
A trial interrupted (its job exited 75, or its invocation died) is told as failed and its point is
queued again, so the next invocation re-runs it in the same run dir and resumes its checkpoint.

The Hydra side (launching trials) is `vicuna_exp.optuna_sweeper`; this module knows no Hydra.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vicuna_exp.errors import UsageError

SEARCH_RECORD = "search.json"  # the study as the last invocation left it: the report reads it
JOURNAL_FILE = "optuna.journal"
_LOCK_FILE = ".optuna.lock"  # held while counting and proposing, so concurrent invocations share n_trials
# Trial user attributes
RUN_DIR_ATTR = "run_dir"  # the trial's run dir, relative to the sweep dir
ERROR_ATTR = "error"
OWNER_ATTR = "owner"  # host:pid of the invocation running it
RESUMES_ATTR = "resumes"  # on a re-queued point: the number of the interrupted trial it continues
# Study user attributes: what the study searches, checked when it is opened again
SPACE_ATTR = "search_space"
OBJECTIVE_ATTR = "objective"


@dataclass(frozen=True)
class Param:
    """One searched key and its distribution."""

    key: str
    kind: str  # float | int | categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def distribution(self) -> Any:
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "categorical":
            return CategoricalDistribution(list(self.choices))
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return FloatDistribution(float(self.low), float(self.high), log=self.log, step=self.step)

    def describe(self) -> str:
        """The space in the grammar it was written in (the form a changed study is compared in)."""
        if self.kind == "categorical":
            return f"choice({', '.join(format_value(c) for c in self.choices)})"
        if self.kind == "int":
            last = int(self.high) + int(self.step or 1)
            text = f"range({int(self.low)}, {last}" + (f", {int(self.step)})" if self.step not in (None, 1) else ")")
        else:
            text = f"interval({self.low!r}, {self.high!r})"
        return f"tag(log, {text})" if self.log else text

    def extremes(self) -> list[Any]:
        """The values a cost bound or a composition check needs: the bounds, or every choice."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "int":
            return [int(self.low), int(self.high)]
        return [float(self.low), float(self.high)]


def parse_space(overrides: list[str]) -> tuple[dict[str, Param], list[str]]:
    """Split overrides into the search space (those with a sweep function or a comma list) and the
    fixed overrides every trial shares, kept verbatim."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    parser = OverridesParser.create()
    space: dict[str, Param] = {}
    fixed: list[str] = []
    for text in overrides:
        try:
            (o,) = parser.parse_overrides([text])
        except Exception as e:  # noqa: BLE001 - Hydra's grammar errors: one line, exit 2
            raise UsageError(f"bad override {text!r}: {e}") from None
        if not o.is_sweep_override():
            fixed.append(text)
            continue
        key, value = o.get_key_element().lstrip("+~"), o.value()
        log = "log" in value.tags
        if isinstance(value, IntervalSweep):
            low, high = float(value.start), float(value.end)
            if not low < high or (log and low <= 0):
                raise UsageError(f"{key}: interval({low}, {high}) needs low < high" + (" and low > 0 for log" if log else ""))
            space[key] = Param(key, "float", low, high, log=log)
        elif isinstance(value, RangeSweep):
            start, stop, step = value.start, value.stop, value.step
            if not all(float(v).is_integer() for v in (start, stop, step)) or step <= 0 or stop - step < start:
                raise UsageError(f"{key}: range({start}, {stop}, {step}) must be integers with at least one value")
            last = int(start) + (int(stop) - int(start) - 1) // int(step) * int(step)
            space[key] = Param(key, "int", int(start), last, log=log, step=int(step))
        elif isinstance(value, ChoiceSweep):
            if len(value.list) < 2:
                raise UsageError(f"{key}: choice() needs at least two values")
            space[key] = Param(key, "categorical", choices=tuple(value.list))
        else:
            raise UsageError(f"{key}: {type(value).__name__} cannot be searched; use interval(), range() or choice()")
    return space, fixed


def space_record(space: dict[str, Param]) -> dict[str, str]:
    return {k: p.describe() for k, p in sorted(space.items())}


def format_value(value: Any) -> str:
    """A proposed value as an override value: floats exactly, strings that read as something else quoted
    (`context=choice('512', '2048')` stays the option name '512')."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        plain = value.replace("_", "").replace("-", "").replace(".", "").replace("/", "")
        if not plain.isalnum() or plain.isdigit() or value.lower() in ("true", "false", "null") \
                or _is_float(value):
            return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def override_key(override: str) -> str:
    return override.partition("=")[0].strip().lstrip("+~")


def trial_overrides(params: dict[str, Any]) -> list[str]:
    """A point as overrides. A number chosen for a config group names its option file
    (`context=choice(512, 2048)` -> `context='512'`), which Hydra reads only when quoted."""
    from vicuna_exp.config import conf_dir

    groups = {p.name for p in conf_dir().iterdir() if p.is_dir()}
    return [f"{k}={format_value(str(v) if k in groups and isinstance(v, int) and not isinstance(v, bool) else v)}"
            for k, v in params.items()]


def default_n_trials() -> int:
    """`n_trials` of `conf/hydra/sweeper/optuna.yaml`, its one home."""
    import yaml

    from vicuna_exp.config import conf_dir

    return int(yaml.safe_load((conf_dir() / "hydra" / "sweeper" / "optuna.yaml").read_text())["n_trials"])


def sample_point(space: dict[str, Param]) -> dict[str, Any]:
    """One point of the space (every key at its first extreme): enough to compose the trials' keys."""
    return {k: p.extremes()[0] for k, p in space.items()}


# ---------------------------------------------------------------- the study


@dataclass
class StudySettings:
    sweep_dir: Path
    study_name: str
    storage: str | None  # None: the journal file in the sweep dir; else an RDB URL or a journal path
    direction: str  # minimize | maximize
    objective: str  # a key of summary.json (dotted for nested ones)
    n_trials: int
    n_jobs: int
    sampler: dict[str, Any]  # `_target_` and its keywords; `seed` is offset per proposal


def check_settings(s: StudySettings) -> None:
    if s.direction not in ("minimize", "maximize"):
        raise UsageError(f"hydra.sweeper.direction={s.direction}: choose minimize or maximize")
    if s.n_trials < 1 or s.n_jobs < 1:
        raise UsageError("hydra.sweeper.n_trials and hydra.sweeper.n_jobs must be at least 1")
    if not s.objective:
        raise UsageError("hydra.sweeper.objective: name a numeric key of summary.json (default best_eval_loss)")


def storage_location(s: StudySettings) -> str:
    """Where the study is, in words a person can find it by (and the wandb group is named from)."""
    if s.storage and "://" in s.storage:
        return s.storage
    return str(Path(s.storage or s.sweep_dir / JOURNAL_FILE).resolve())


def make_storage(s: StudySettings) -> Any:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if s.storage and "://" in s.storage:
        return optuna.storages.RDBStorage(s.storage)
    path = Path(storage_location(s))
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def study_group(s: StudySettings) -> str:
    """The wandb group of a study: its name and where it is stored, so two studies never share one."""
    import hashlib

    return f"{s.study_name}-{hashlib.sha256(storage_location(s).encode()).hexdigest()[:6]}"


@contextlib.contextmanager
def proposal_lock(s: StudySettings) -> Iterator[None]:
    """One invocation at a time counts the study's trials and proposes the next (on this machine:
    across nodes two invocations may overshoot n_trials by the trials they ask at the same moment)."""
    s.sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(s.sweep_dir / _LOCK_FILE, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def open_study(s: StudySettings, space: dict[str, Param]) -> Any:
    """The study named `s.study_name` in its storage, created on first use. An existing one that
    searches another space, objective or direction is refused, naming the differences."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = make_storage(s)
    wanted = {"space": space_record(space), "objective": s.objective, "direction": s.direction}
    with proposal_lock(s):
        try:
            study = optuna.load_study(study_name=s.study_name, storage=storage)
        except KeyError:
            study = optuna.create_study(study_name=s.study_name, storage=storage, direction=s.direction)
            study.set_user_attr(SPACE_ATTR, wanted["space"])
            study.set_user_attr(OBJECTIVE_ATTR, s.objective)
            return study
    had = {"space": study.user_attrs.get(SPACE_ATTR, {}), "objective": study.user_attrs.get(OBJECTIVE_ATTR),
           "direction": study.direction.name.lower()}
    diffs = _differences(had, wanted)
    if diffs:
        raise UsageError(f"study {s.study_name!r} in {storage_location(s)} searches something else: "
                         f"{'; '.join(diffs)}. Set hydra.sweeper.study_name=NEW_NAME (or another hydra.sweep.dir) "
                         "for a new study, or search what it searches to continue it")
    return study


def _differences(had: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    out = []
    old, new = had["space"], wanted["space"]
    for k in sorted(set(old) | set(new)):
        if k not in new:
            out.append(f"{k}: searched there ({old[k]}), not here")
        elif k not in old:
            out.append(f"{k}: searched here ({new[k]}), not there")
        elif old[k] != new[k]:
            out.append(f"{k}: {old[k]} there, {new[k]} here")
    for k in ("objective", "direction"):
        if had[k] != wanted[k]:
            out.append(f"{k}: {had[k]} there, {wanted[k]} here")
    return out


def counted_trials(study: Any) -> list[Any]:
    """The trials that count towards n_trials: every one but those interrupted and queued again."""
    trials = study.get_trials(deepcopy=False)
    continued = {t.user_attrs.get(RESUMES_ATTR) for t in trials} - {None}
    return [t for t in trials if t.number not in continued]


def fail_abandoned_trials(study: Any) -> list[int]:
    """Running trials whose invocation on this host is gone (killed): failed and queued again."""
    from optuna.trial import TrialState

    host, out = socket.gethostname(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = str(t.user_attrs.get(OWNER_ATTR) or "")
        owner_host, _, pid = owner.rpartition(":")
        if owner_host == host and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            requeue_interrupted(study, t.number, t.params, f"its invocation (pid {pid}) ended without telling")
            out.append(t.number)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def requeue_interrupted(study: Any, number: int, params: dict[str, Any], why: str) -> None:
    from optuna.trial import TrialState

    study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
    study.enqueue_trial(dict(params), user_attrs={RESUMES_ATTR: number, ERROR_ATTR: f"continues trial {number}: {why}"})


def propose(study: Any, s: StudySettings, space: dict[str, Param], limit: int) -> list[Any]:
    """Up to `limit` new trials, none beyond the study's n_trials (queued points first)."""
    import hydra.utils
    from optuna.trial import TrialState

    distributions = {k: p.distribution() for k, p in space.items()}
    asked = []
    with proposal_lock(s):
        fail_abandoned_trials(study)
        for _ in range(limit):
            counted = counted_trials(study)
            k = len(counted)
            if sum(t.state != TrialState.WAITING for t in counted) >= s.n_trials:
                break  # a queued point (an interrupted trial's) still runs while there is room for it
            kwargs = {k_: v for k_, v in s.sampler.items() if k_ != "_target_"}
            if kwargs.get("seed") is not None:
                kwargs["seed"] = int(kwargs["seed"]) + k
            study.sampler = hydra.utils.instantiate({"_target_": s.sampler["_target_"]}, **kwargs)
            trial = study.ask(distributions)
            trial.set_user_attr(OWNER_ATTR, f"{socket.gethostname()}:{os.getpid()}")
            asked.append(trial)
    return asked


# ---------------------------------------------------------------- the objective


def objective_value(summary: dict[str, Any], key: str) -> tuple[bool, float | None]:
    """(the key exists, its value as a finite float or None)."""
    node: Any = summary
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, (int, float)) or not math.isfinite(node):
        return True, None
    return True, float(node)


def numeric_keys(summary: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in summary.items():
        if isinstance(v, dict):
            out += numeric_keys(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append(f"{prefix}{k}")
    return out


# ---------------------------------------------------------------- search.json


def study_record(study: Any, s: StudySettings, space: dict[str, Param]) -> dict[str, Any]:
    """Everything a report needs, from the storage: every trial once, and the best."""
    from optuna.distributions import distribution_to_json

    trials = []
    all_trials = study.get_trials(deepcopy=False)
    continued_by = {t.user_attrs[RESUMES_ATTR]: t.number for t in all_trials if t.user_attrs.get(RESUMES_ATTR) is not None}
    for t in all_trials:
        trials.append({"number": t.number, "state": t.state.name.lower(), "value": t.value,
                       "params": dict(t.params or t.system_attrs.get("fixed_params") or {}), "run_dir": t.user_attrs.get(RUN_DIR_ATTR),
                       "error": t.user_attrs.get(ERROR_ATTR), "resumes": t.user_attrs.get(RESUMES_ATTR),
                       "continued_by": continued_by.get(t.number),
                       "started_at": _ts(t.datetime_start), "finished_at": _ts(t.datetime_complete)})
    sign = 1 if s.direction == "minimize" else -1
    done = sorted((t for t in trials if t["state"] == "complete" and t["value"] is not None),
                  key=lambda t: (sign * t["value"], t["number"]))  # ties: the earlier trial
    best = done[0] if done else None
    return {"study_name": s.study_name, "storage": storage_location(s), "objective": s.objective,
            "direction": s.direction, "n_trials": s.n_trials, "sampler": dict(s.sampler),
            "space": space_record(space),
            "distributions": {k: distribution_to_json(p.distribution()) for k, p in sorted(space.items())},
            "trials": trials, "best": best}


def _ts(dt: Any) -> float | None:
    return dt.timestamp() if dt is not None else None


def write_record(path: Path, data: dict[str, Any]) -> None:
    """Atomic: a report (or a concurrent invocation) never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_record(sweep_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((sweep_dir / SEARCH_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("trials"), list) else None
