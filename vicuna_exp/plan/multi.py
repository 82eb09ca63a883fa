"""`vicuna-exp plan -m ...` and `vicuna-exp plan sweep=NAME`: one table for every job of a sweep,
printed before any of it is launched (nothing is trained, nothing is loaded)."""

from __future__ import annotations

from vicuna_exp.errors import EXIT_OK, UsageError


def wants_table(argv: list[str]) -> bool:
    return any(a in ("-m", "--multirun") or a.startswith("sweep=") for a in argv)


def main(argv: list[str]) -> int:
    from vicuna_exp.hydra_app import compose, expand_sweep, explain_config_error, quote_numeric_choices
    from vicuna_exp.plan.report import table
    from vicuna_exp.sweep import job_arms, load_spec, plan_sweep

    named = [a.partition("=")[2] for a in argv if a.startswith("sweep=")]
    rest = [a for a in argv if not a.startswith("sweep=") and a not in ("-m", "--multirun")]
    if named and load_spec(named[0]).search:
        from vicuna_exp.sweep_search import search_overrides

        app, hydra, _ = search_overrides(load_spec(named[0]), rest)
        print(search_table(app, hydra))
        return EXIT_OK
    if any(a.partition("=")[0].lstrip("+~") == "hydra/sweeper" for a in rest):
        print(search_table([a for a in rest if not _is_hydra(a)], [a for a in rest if _is_hydra(a)]))
        return EXIT_OK
    if named:
        plan = plan_sweep(load_spec(named[0]), rest)
        jobs, keys, arms = plan.jobs, plan.name_keys, job_arms(plan)
    else:
        jobs = expand_sweep(quote_numeric_choices(rest))
        keys = sorted({o.partition("=")[0] for job in jobs for o in job
                       if len({x for j in jobs for x in j if x.partition("=")[0] == o.partition("=")[0]}) > 1})
        arms = [None] * len(jobs)
    cfgs, labels = [], []
    for job, arm in zip(jobs, arms, strict=True):
        try:
            cfgs.append(compose(job))
        except Exception as e:  # noqa: BLE001 - composition errors: one line, exit 2
            raise UsageError(f"job {' '.join(job)}: {explain_config_error(e)}") from None
        named_by = [f"arm={arm}"] if arm else []
        named_by += [o.replace("'", "") for o in job if o.partition("=")[0] in keys]
        labels.append(",".join(named_by) or "default")
    print(table(cfgs, labels))
    return EXIT_OK


def _is_hydra(override: str) -> bool:
    return override.partition("=")[0].lstrip("+~").startswith(("hydra.", "hydra/"))


def search_table(app: list[str], hydra: list[str]) -> str:
    """A study priced as n_trials times its most expensive point: every corner of the space (each
    key at its bounds, or each choice) is planned, and the dearest one is shown."""
    import itertools

    from vicuna_exp import search
    from vicuna_exp.hydra_app import compose, explain_config_error
    from vicuna_exp.plan.estimate import make_plan
    from vicuna_exp.plan.report import table

    space, fixed = search.parse_space(app)
    if not space:
        raise UsageError("hydra/sweeper=optuna needs a search space, e.g. 'optim.lr=tag(log, interval(1e-5, 1e-3))'")
    n_trials = next((int(o.partition("=")[2]) for o in reversed(hydra)
                     if o.partition("=")[0].lstrip("+~") == "hydra.sweeper.n_trials"), None) or search.default_n_trials()
    corners = list(itertools.islice(itertools.product(*(p.extremes() for p in space.values())), 256))
    priced = []
    for values in corners:
        point = search.trial_overrides(dict(zip(space, values, strict=True)))
        try:
            cfg = compose(fixed + point)
        except UsageError:
            raise
        except Exception as e:  # noqa: BLE001 - composition errors: one line, exit 2
            raise UsageError(f"search point {' '.join(point)}: {explain_config_error(e)}") from None
        p = make_plan(cfg)
        priced.append(((p.hours_total if p.hours_total == p.hours_total else 0.0, p.usd_on_demand), cfg, point))
    _, worst, point = max(priced, key=lambda x: x[0])
    plan = make_plan(worst)
    return (f"{table([worst], [','.join(point)])}\n"
            f"the most expensive of {len(corners)} corners of the space ({', '.join(space)}) above; "
            f"a study of {n_trials} trials costs at most {n_trials} x that: "
            f"${n_trials * plan.usd_on_demand:,.0f} on demand, ${n_trials * plan.usd_spot:,.0f} on spot, "
            f"{n_trials * plan.hours_total:.1f} h")
