"""`vicuna-exp <command>`: dispatch only.

Commands that compose a configuration are Hydra apps over `conf/`; commands that act on
finished runs take paths. Nothing heavy is imported here: each command's module is imported
only when that command runs, so `vicuna-exp --help` answers at once.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

from vicuna_exp.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, UsageError


@dataclass(frozen=True)
class Command:
    target: str  # "module:function"
    help: str
    hydra: bool  # True: a Hydra app taking overrides; False: plain argv
    run_dir: bool = True  # a Hydra app that keeps a run dir; False: it writes nothing under outputs/


COMMANDS: dict[str, Command] = {
    "train": Command("vicuna_exp.job:main", "train a model (Hydra overrides; -m for a multirun)", True),
    "prepare": Command("vicuna_exp.data.prepare:main", "clean, split, encode and cache a dataset", True,
                       run_dir=False),
    "plan": Command("vicuna_exp.plan:main", "memory, time and cost of a configuration before launching", True,
                    run_dir=False),
    "sweep": Command("vicuna_exp.sweep_search:main", "run a named ablation or search from sweeps/ as a Hydra multirun",
                     False),
    "report": Command("vicuna_exp.report:main", "compare the runs of a sweep dir: table, plots, HTML", False),
    "sync": Command("vicuna_exp.sync:main", "upload a sweep's offline wandb runs", False),
    "export": Command("vicuna_exp.export:main", "write a Hugging Face model from a checkpoint", False),
    "sky": Command("vicuna_exp.sky:main", "write a SkyPilot task YAML for the composed config", True),
    "eval": Command("", "evaluate a run: eval generate | judge | report (Hydra overrides)", True),
}

EVAL_COMMANDS: dict[str, Command] = {
    "generate": Command("vicuna_exp.eval.generate:main", "answer a question set with a trained model", True),
    "judge": Command("vicuna_exp.eval.judge:main", "grade answers with an LLM judge", True),
    "report": Command("vicuna_exp.eval.report:main", "scores per model and category", True),
}

USAGE = """usage: vicuna-exp <command> [args]

Reproduce and ablate the Vicuna fine-tuning recipe.

commands:
{commands}

Hydra commands take overrides (`key=value`, `group=option`), `--cfg job`, `--help` and `-m`.
Exit codes: 0 completed, 1 failed while running, 2 bad usage/config/data/path, 75 interrupted (resumable).
Example: vicuna-exp train experiment=vicuna-7b model.path=/path/to/llama-7b-hf context=2048
"""


def _usage() -> str:
    rows = "\n".join(f"  {name:<9} {cmd.help}" for name, cmd in COMMANDS.items())
    return USAGE.format(commands=rows)


def _load(target: str) -> Callable:
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return EXIT_OK if argv else EXIT_USAGE
    name, rest = argv[0], argv[1:]
    cmd = COMMANDS.get(name)
    if cmd is None:
        print(f"vicuna-exp: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return EXIT_USAGE
    prog = f"vicuna-exp {name}"
    if name == "eval":
        if not rest or rest[0] not in EVAL_COMMANDS:
            print(f"usage: vicuna-exp eval {{{'|'.join(EVAL_COMMANDS)}}} [overrides]", file=sys.stderr)
            return EXIT_OK if rest and rest[0] in ("-h", "--help") else EXIT_USAGE
        cmd, rest, prog = EVAL_COMMANDS[rest[0]], rest[1:], f"vicuna-exp eval {rest[0]}"
    if name == "plan":
        from vicuna_exp.plan.multi import wants_table

        if wants_table(rest):  # a whole sweep: one table, no jobs run
            cmd = Command("vicuna_exp.plan.multi:main", cmd.help, False, run_dir=False)
    if name == "sky" and "--sweep" in rest:  # `sky --sweep NAME` is `sky sky.sweep=NAME`
        i = rest.index("--sweep")
        if i + 1 >= len(rest):
            print("usage: vicuna-exp sky [--sweep NAME] [overrides]", file=sys.stderr)
            return EXIT_USAGE
        rest = [*rest[:i], f"sky.sweep={rest[i + 1]}", *rest[i + 2:]]
    try:
        if cmd.hydra:
            from vicuna_exp.hydra_app import run_hydra_app

            return _exit(run_hydra_app(cmd.target, rest, prog=prog, run_dir=cmd.run_dir))
        return _exit(_load(cmd.target)(rest))
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def _exit(code: int | None) -> int:
    code = EXIT_OK if code is None else int(code)
    if code not in (EXIT_OK, EXIT_FAILED, EXIT_USAGE, 75):
        code = EXIT_FAILED
    return code

