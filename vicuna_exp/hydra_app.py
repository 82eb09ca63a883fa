"""Run a task function as a Hydra app over `conf/`, with the project's exit codes.

Every job is composed here first (`check_composes`: each job of a basic multirun too), then Hydra
composes again and calls the task, which returns an exit code. Errors found while composing mean
nothing started: they become one line naming the key and the valid keys or values, and exit 2. A multirun's code is 0 when every job completed, else 1; a failing job never
stops the others, because task functions catch their own errors.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from vicuna_exp.config import conf_dir, register_configs, with_lr_in_force
from vicuna_exp.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, UsageError
from vicuna_exp.preflight import check_output_location

_HELP_FLAGS = {"-h", "--help", "--hydra-help", "-i", "--info", "--version", "--shell-completion", "-sc"}
_MULTIRUN_FLAGS = {"-m", "--multirun"}
_PRINT_FLAGS = {"-c", "--cfg"}  # the config is printed; no job runs, nothing is written
_VALUED_FLAGS = {"-c", "--cfg", "-p", "--package", "--config-path", "-cp", "--config-name", "-cn",
                 "--config-dir", "-cd", "--experimental-rerun"}  # the next argument is the flag's


def _load(target: str) -> Callable[[DictConfig], int]:
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)


def quote_numeric_choices(args: list[str]) -> list[str]:
    """`context=2048` names the option file `context/2048.yaml`; Hydra would read an int and refuse."""
    groups = {p.name for p in conf_dir().iterdir() if p.is_dir()}
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") in groups and re.fullmatch(r"[\w.\-]+(,[\w.\-]+)*", value):
            value = ",".join(f"'{v}'" if re.fullmatch(r"-?\d+", v) else v for v in value.split(","))
            arg = f"{key}={value}"
        out.append(arg)
    return out


def compose(overrides: list[str], *, return_hydra_config: bool = False) -> DictConfig:
    """Compose the config as the CLI would (for tests, notebooks, the pre-check, and a task that
    composes other configs, such as `sky sky.sweep=NAME` composing each point of a sweep).

    A key left `MISSING` (an option that does not supply what its schema asks for) is an error
    here, naming the keys, since the job would otherwise stop at the first read of one."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    register_configs()
    running = GlobalHydra.instance().hydra  # inside a Hydra app: set aside while composing, then put back
    running_cfg = HydraConfig.instance().cfg
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="compose"):
            cfg = hydra_compose("config", overrides=quote_numeric_choices(overrides),
                                return_hydra_config=return_hydra_config)
    finally:
        if running is not None:
            GlobalHydra.instance().initialize(running)
            HydraConfig.instance().cfg = running_cfg
    missing = sorted(_missing_keys(cfg))
    if missing:
        raise UsageError(f"no value for {', '.join(missing)}: set it (key=value) or choose an option that supplies it")
    return with_lr_in_force(cfg, overrides)


def _missing_keys(cfg: DictConfig) -> set[str]:
    """Keys of the app's sections still `MISSING` (Hydra's own node is left alone: its runtime
    values are filled when a job runs)."""
    from omegaconf import OmegaConf

    out: set[str] = set()
    for key in cfg:
        if key == "hydra":
            continue
        if OmegaConf.is_missing(cfg, key):
            out.add(str(key))
        elif OmegaConf.is_config(cfg[key]):
            out |= OmegaConf.missing_keys(cfg[key])  # full keys (`model.hidden_size`)
    return out


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """The jobs Hydra's basic sweeper makes of these overrides (same parser, same order)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as e:  # noqa: BLE001 - Hydra's grammar errors: one line, exit 2
        raise UsageError(f"bad override: {e}") from None
    (batch,) = BasicSweeper.split_arguments(parsed, None)
    return [list(job) for job in batch]


def check_composes(overrides: list[str], *, multirun: bool) -> list[DictConfig]:
    """Compose what will run (every job of a basic multirun) before anything starts, so a bad
    key or value stops the command with one line and exit 2. Returns the composed jobs, with
    Hydra's own node (where each will write)."""
    args = _overrides(overrides)
    sweeper = next((a.partition("=")[2] for a in args if a.partition("=")[0].lstrip("+~") == "hydra/sweeper"), "basic")
    if multirun and sweeper == "optuna":  # it draws its own values: one point of its space is composed
        from vicuna_exp import search

        space, fixed = search.parse_space(args)
        args = fixed + search.trial_overrides(search.sample_point(space))
    elif multirun and sweeper != "basic":
        return []  # another sweeper's grammar: Hydra checks its values as it goes
    composed = []
    for job in (expand_sweep(args) if multirun else [args]):
        try:
            composed.append(compose(job, return_hydra_config=True))
        except UsageError:
            raise
        except Exception as e:  # noqa: BLE001 - Hydra's and OmegaConf's composition errors
            raise UsageError(explain_config_error(e)) from None
    return composed


def _overrides(argv: list[str]) -> list[str]:
    """The overrides of a Hydra command line: flags and their values left out."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a.startswith("-"):
            skip = a in _VALUED_FLAGS
        else:
            out.append(a)
    return out


def explain_config_error(err: BaseException) -> str:
    """Turn Hydra/OmegaConf composition errors into one line that names the key and the choices."""
    from omegaconf.errors import OmegaConfBaseException

    from vicuna_exp.config import OPTION_SCHEMAS, schema_option

    text = str(err).strip()
    cause = err.__cause__ or err.__context__
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        key = cause.full_key
        if "not in struct" in str(cause) or "Key '" in str(cause) and "not" in str(cause):
            parent = key.rsplit(".", 1)[0] if "." in key else ""
            keys = ", ".join(_keys_of(parent, getattr(cause, "object_type", None)))
            return f"unknown key '{key}'" + (f"; valid keys of '{parent}'{_option_of(cause)}: {keys}" if parent else
                                            f"; valid top-level keys: {keys}")
        msg = str(cause).splitlines()[0]
        return f"{key}: {msg}"
    m = re.search(r"Could not find '([^']+)'", text)
    if m:
        group, _, option = m.group(1).rpartition("/")
        schemas = {schema_option(n) for schemas in OPTION_SCHEMAS.values() for n in schemas}
        options = [o for o in re.findall(r"^\s+(\S+)$", text, flags=re.M) if o not in schemas]
        return f"unknown option '{option}' for {group or 'config'}; choose one of: {', '.join(options) or '(none)'}"
    first = " ".join(line.strip() for line in text.splitlines() if line.strip())
    return first


def _option_of(cause: BaseException) -> str:
    """` (backend.name=ddp)` when the section's schema is one option's: its keys are that option's."""
    from vicuna_exp.config import OPTION_SCHEMAS

    node = getattr(cause, "parent_node", None)
    for section, schemas in OPTION_SCHEMAS.items():
        if getattr(cause, "object_type", None) in schemas.values() and node is not None and "name" in node:
            return f" for {section}.name={node.name}"
    return ""


def _keys_of(dotted: str, schema: type | None = None) -> list[str]:
    """The keys of a section: of the schema the error came from, else of the root schema's node."""
    import dataclasses

    from omegaconf import OmegaConf

    from vicuna_exp.config import VicunaConfig

    if schema is not None and dataclasses.is_dataclass(schema):
        return [f.name for f in dataclasses.fields(schema)]
    node: Any = OmegaConf.structured(VicunaConfig)
    for part in filter(None, dotted.split(".")):
        if not OmegaConf.is_config(node) or part not in node or OmegaConf.is_missing(node, part):
            return []
        node = node[part]
    return list(node.keys()) if OmegaConf.is_config(node) else []


def run_task(target: str, cfg: DictConfig, prog: str) -> int:
    """Run one job; errors become exit codes here, so a multirun keeps going.

    Value checks are the task's own (`train` validates the whole recipe; `plan` needs no weights).
    """
    try:
        from hydra.core.hydra_config import HydraConfig

        with_lr_in_force(cfg, list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else [])
        return int(_load(target)(cfg) or EXIT_OK)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # a crash while running: one line here, the traceback in the job log
        import logging

        logging.getLogger("vicuna_exp").debug("".join(traceback.format_exception(e)))
        print(f"{prog}: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED


# For a command without a run dir of its own: Hydra writes no `.hydra/` and no log file, and its run
# dir is the working directory, so nothing appears under outputs/. The user's own values win.
_NO_RUN_DIR = {"hydra.run.dir": ".", "hydra.output_subdir": "null", "hydra/job_logging": "console"}


def without_run_dir(argv: list[str]) -> list[str]:
    given = {a.split("=", 1)[0].lstrip("+~") for a in argv}
    return [f"{key}={value}" for key, value in _NO_RUN_DIR.items() if key not in given] + argv


def register_all() -> None:
    """The schemas into Hydra's ConfigStore, and the project's sweeper into its plugin registry."""
    from vicuna_exp import optuna_sweeper

    register_configs()
    optuna_sweeper.register()


def run_hydra_app(target: str, argv: list[str], *, prog: str, run_dir: bool = True) -> int:
    import hydra

    register_all()
    argv = quote_numeric_choices(argv)
    if not run_dir and not any(a in _MULTIRUN_FLAGS for a in argv):
        argv = without_run_dir(argv)
    multirun = any(a in _MULTIRUN_FLAGS for a in argv)
    if not any(a.split("=")[0] in _HELP_FLAGS for a in argv):
        composed = check_composes(argv, multirun=multirun)
        if run_dir and not multirun and not any(a.split("=")[0] in _PRINT_FLAGS for a in argv):
            # Hydra writes `.hydra/` there first: a read-only or missing location is usage (exit 2)
            check_output_location(Path(composed[0].hydra.run.dir), "hydra.run.dir")
        if run_dir and multirun and composed:  # every job's run dir lies under the sweep dir
            check_output_location(Path(composed[0].hydra.sweep.dir), "hydra.sweep.dir")

    # Jobs may run in other processes (joblib): each leaves its exit code in a file here.
    codes_dir = Path(tempfile.mkdtemp(prefix="vicuna-exp-codes-"))
    os.environ[_CODES_ENV] = str(codes_dir)

    def task(cfg: DictConfig) -> int:
        return _job(target, prog, cfg)

    app = hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")(task)
    saved_argv = sys.argv
    sys.argv = [prog, *argv]
    try:
        app()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else EXIT_FAILED
        # Hydra exits 1 for errors it finds while composing, before any job started.
        return EXIT_USAGE if (code == EXIT_FAILED and not _codes(codes_dir)) else code
    finally:
        sys.argv = saved_argv
        os.environ.pop(_CODES_ENV, None)
    codes = _codes(codes_dir)
    shutil.rmtree(codes_dir, ignore_errors=True)
    if not codes:
        return EXIT_OK  # --help, --cfg and friends
    if multirun:
        return EXIT_OK if all(c == EXIT_OK for c in codes) else EXIT_FAILED
    return codes[0]


_CODES_ENV = "VICUNA_EXP_JOB_CODES_DIR"


def _job(target: str, prog: str, cfg: DictConfig) -> int:
    """One job; its exit code also goes to a file, since launchers may run jobs in other processes."""
    code = run_task(target, cfg, prog)
    codes_dir = os.environ.get(_CODES_ENV)
    if codes_dir and Path(codes_dir).is_dir():
        (Path(codes_dir) / f"{os.getpid()}-{time.monotonic_ns()}.code").write_text(str(code))
    return code


def _codes(codes_dir: Path) -> list[int]:
    return [int(p.read_text()) for p in sorted(codes_dir.glob("*.code"))]
