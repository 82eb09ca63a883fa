"""`vicuna-exp plan -m ...` and `vicuna-exp plan sweep=NAME`: one table for every job of a sweep,
printed before any of it is launched (nothing is trained, nothing is loaded)."""

from __future__ import annotations

from vicuna_exp.errors import EXIT_OK, UsageError


def wants_table(argv: list[str]) -> bool:
    return any(a in ("-m", "--multirun") or a.startswith("sweep=") for a in argv)


def main(argv: list[str]) -> int:
    from vicuna_exp.hydra_app import compose, expand_sweep, explain_config_error, quote_numeric_choices
    from vicuna_exp.plan.report import table
    from vicuna_exp.sweep import load_spec, plan_sweep

    named = [a.partition("=")[2] for a in argv if a.startswith("sweep=")]
    rest = [a for a in argv if not a.startswith("sweep=") and a not in ("-m", "--multirun")]
    if named:
        plan = plan_sweep(load_spec(named[0]), rest)
        jobs, keys = plan.jobs, plan.name_keys
    else:
        jobs = expand_sweep(quote_numeric_choices(rest))
        keys = sorted({o.partition("=")[0] for job in jobs for o in job
                       if len({x for j in jobs for x in j if x.partition("=")[0] == o.partition("=")[0]}) > 1})
    cfgs, labels = [], []
    for job in jobs:
        try:
            cfgs.append(compose(job))
        except Exception as e:  # noqa: BLE001 - composition errors: one line, exit 2
            raise UsageError(f"job {' '.join(job)}: {explain_config_error(e)}") from None
        labels.append(",".join(o.replace("'", "") for o in job if o.partition("=")[0] in keys) or "default")
    print(table(cfgs, labels))
    return EXIT_OK
