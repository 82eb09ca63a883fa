"""`hydra/sweeper=optuna`: Optuna studies as Hydra multiruns, on current Optuna.

    vicuna-exp train -m hydra/sweeper=optuna 'optim.lr=tag(log, interval(1e-5, 1e-3))' \
        'optim.warmup_ratio=interval(0, 0.1)' hydra.sweeper.n_trials=20 hydra.sweep.dir=outputs/lr

Each batch of `n_jobs` proposals goes to the configured launcher (basic, joblib, SLURM), so trials
run wherever a grid's jobs would; the objective is read from each trial's `summary.json`
afterwards, so it does not depend on what the task returns. Settings: `conf/hydra/sweeper/optuna.yaml`;
the study itself: `vicuna_exp.search`.

Hydra instantiates sweepers only from its `hydra_plugins` namespace, and this project ships no
such package, so `register()` hands Hydra's plugin registry the class under a name in that
namespace (Hydra's documented `Plugins.register`); the YAML's `_target_` names it.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from vicuna_exp import search
from vicuna_exp.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, UsageError
from vicuna_exp.tracking import TRIAL_ENV  # the trial's study, number and parameters, for its wandb config

log = logging.getLogger(__name__)

PLUGIN_MODULE = "hydra_plugins.vicuna_exp_optuna"
GROUP_KEY = "logger.group"


class OptunaSweeper(Sweeper):
    """Ask a batch, launch it, tell each trial its objective (or that it failed), until the study
    holds `n_trials`. A usage error (a bad space, an objective no summary has) exits 2; a trial
    interrupted (exit 75) stops the sweep with 75, its point queued to resume on the next run."""

    def __init__(self, sampler: DictConfig, direction: str, objective: str, n_trials: int, n_jobs: int,
                 storage: str | None = None, study_name: str | None = None,
                 params: DictConfig | None = None) -> None:
        self.settings_in = dict(sampler=OmegaConf.to_container(sampler, resolve=True), direction=str(direction),
                                objective=str(objective), n_trials=int(n_trials), n_jobs=int(n_jobs),
                                storage=storage, study_name=study_name)
        self.params = {str(k): str(v) for k, v in (params or {}).items()}
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher: Any = None
        self.job_idx = 0

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        try:
            return self._sweep(arguments)
        except UsageError as e:
            print(f"vicuna-exp: error: {e}", file=sys.stderr)
            raise SystemExit(EXIT_USAGE) from None  # not an Exception: Hydra would report it as a crash (1)

    def _sweep(self, arguments: list[str]) -> list[Any]:
        assert self.config is not None
        space, fixed = search.parse_space([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        if not space:
            raise UsageError("hydra/sweeper=optuna needs a search space: at least one override such as "
                             "'optim.lr=tag(log, interval(1e-5, 1e-3))', interval(a, b), choice(...) or range(a, b)")
        sweep_dir = Path(self.config.hydra.sweep.dir)
        s = search.StudySettings(sweep_dir=sweep_dir, study_name=self.settings_in["study_name"] or sweep_dir.name,
                                 **{k: v for k, v in self.settings_in.items() if k != "study_name"})
        search.check_settings(s)
        if not any(search.override_key(o) == GROUP_KEY for o in fixed):  # one wandb group per study
            fixed.append(f"{GROUP_KEY}={search.study_group(s)}")
        self._check_composes(fixed + search.trial_overrides(search.sample_point(space)))
        study = search.open_study(s, space)
        name_from_params = self._dirname_from(space, fixed)
        record = sweep_dir / search.SEARCH_RECORD
        returns: list[Any] = []
        objective_checked = False
        print(f"[optuna] study {s.study_name!r} in {search.storage_location(s)}: "
              f"{len(search.counted_trials(study))}/{s.n_trials} trials so far")
        try:
            while True:
                trials = search.propose(study, s, space, s.n_jobs)
                if not trials:
                    break
                batch = [fixed + search.trial_overrides(t.params) + [self._trial_env(s, t), name_from_params]
                         for t in trials]
                results = self.launcher.launch(batch, initial_job_idx=self.job_idx)
                self.job_idx += len(batch)
                returns.append(results)
                outcomes = [self._outcome(sweep_dir, t, r) for t, r in zip(trials, results, strict=True)]
                interrupted = False
                for trial, (code, summary) in zip(trials, outcomes, strict=True):
                    interrupted |= self._tell(study, s, trial, code, summary)
                    if summary and not objective_checked:
                        objective_checked = True
                        if not search.objective_value(summary, s.objective)[0]:
                            raise UsageError(
                                f"objective {s.objective!r} is not a key of summary.json (trial {trial.number}); "
                                f"numeric keys: {', '.join(search.numeric_keys(summary))}")
                search.write_record(record, search.study_record(study, s, space))
                if interrupted:
                    print(f"[optuna] a trial was interrupted; its point is queued: run the same command again "
                          f"to resume it and continue the study ({search.storage_location(s)})", file=sys.stderr)
                    raise SystemExit(EXIT_INTERRUPTED)
        finally:
            search.write_record(record, search.study_record(study, s, space))
        best = search.study_record(study, s, space)["best"]
        if best:
            print(f"[optuna] best trial {best['number']}: {s.objective}={best['value']:.6g} "
                  f"with {', '.join(search.trial_overrides(best['params']))}")
        return returns

    def _check_composes(self, overrides: list[str]) -> None:
        """One point of the space composed before any trial: a key the schema lacks is exit 2 here."""
        try:
            self.validate_batch_is_legal([overrides])
        except Exception as e:  # noqa: BLE001 - Hydra's composition errors, as one line
            raise UsageError(f"search space or fixed overrides do not compose: {' '.join(str(e).split())}") from None

    def _dirname_from(self, space: dict[str, search.Param], fixed: list[str]) -> str:
        """A trial's run dir is named from its parameters alone (what the config already leaves out of
        dir names stays out, and so does every fixed override), so a re-proposed point finds its dir."""
        assert self.config is not None
        keys = list(self.config.hydra.job.config.override_dirname.exclude_keys or [])
        keys += [k for k in map(search.override_key, fixed) if k not in keys and k not in space]
        return f"hydra.job.config.override_dirname.exclude_keys=[{','.join(keys)}]"

    @staticmethod
    def _trial_env(s: search.StudySettings, trial: Any) -> str:
        data = json.dumps({"study": s.study_name, "number": trial.number, "params": trial.params}, sort_keys=True)
        return f"++hydra.job.env_set.{TRIAL_ENV}='" + data.replace("\\", "\\\\").replace("'", "\\'") + "'"

    @staticmethod
    def _outcome(sweep_dir: Path, trial: Any, result: Any) -> tuple[int, dict[str, Any] | None]:
        """The job's exit code and its summary.json, read from its run dir."""
        from hydra.core.utils import JobStatus

        if result.status != JobStatus.COMPLETED:
            trial.set_user_attr(search.ERROR_ATTR, f"{type(result._return_value).__name__}: {result._return_value}")
            return 1, None
        code = result.return_value if isinstance(result.return_value, int) else EXIT_OK
        run_dir = Path(result.hydra_cfg.hydra.runtime.output_dir)
        try:
            trial.set_user_attr(search.RUN_DIR_ATTR, run_dir.resolve().relative_to(sweep_dir.resolve()).as_posix())
        except ValueError:
            trial.set_user_attr(search.RUN_DIR_ATTR, str(run_dir))
        try:
            summary = json.loads((run_dir / "summary.json").read_text())
        except (OSError, ValueError):
            summary = None
        return code, summary if isinstance(summary, dict) else None

    @staticmethod
    def _tell(study: Any, s: search.StudySettings, trial: Any, code: int, summary: dict[str, Any] | None) -> bool:
        """Tell the trial its objective, or that it failed; True when it was interrupted."""
        from optuna.trial import TrialState

        status = (summary or {}).get("status")
        if code == EXIT_INTERRUPTED or status == "interrupted":
            search.requeue_interrupted(study, trial.number, trial.params, "it was interrupted (exit 75)")
            return True
        value = search.objective_value(summary, s.objective)[1] if summary else None
        if code == EXIT_OK and status == "completed" and value is not None:
            study.tell(trial, value)
            return False
        why = (summary or {}).get("error") or (f"exit code {code}" if code != EXIT_OK else
                                                f"{s.objective} is not a finite number in summary.json")
        if not trial.user_attrs.get(search.ERROR_ATTR):
            trial.set_user_attr(search.ERROR_ATTR, str(why)[:500])
        study.tell(trial, state=TrialState.FAIL)
        print(f"[optuna] trial {trial.number} failed: {str(why).splitlines()[0] if why else ''}", file=sys.stderr)
        return False


def register() -> None:
    """Make `hydra/sweeper=optuna` instantiable (see the module docstring); idempotent.

    Hydra looks the class up by its dotted name, both in its registry and by import, so the name
    is given a module of its own: `hydra_plugins.vicuna_exp_optuna`, holding a subclass that
    changes nothing but its home."""
    import types

    import hydra_plugins
    from hydra.core.plugins import Plugins

    module = sys.modules.get(PLUGIN_MODULE)
    if module is None:
        module = types.ModuleType(PLUGIN_MODULE, "vicuna_exp's Optuna sweeper, under Hydra's plugin namespace")
        module.OptunaSweeper = type(OptunaSweeper.__name__, (OptunaSweeper,), {"__module__": PLUGIN_MODULE})
        sys.modules[PLUGIN_MODULE] = module
        setattr(hydra_plugins, PLUGIN_MODULE.rpartition(".")[2], module)
    plugins = Plugins.instance()
    if f"{PLUGIN_MODULE}.{OptunaSweeper.__name__}" not in plugins.class_name_to_class:
        plugins.register(module.OptunaSweeper)
