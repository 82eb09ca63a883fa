"""`vicuna-exp sky [overrides]`: write the SkyPilot task that runs this config on cloud GPUs.

The task asks for the config's accelerators (hardware.accelerator x launcher.nproc_per_node, on
launcher.nnodes nodes, spot by default), mounts a checkpoint bucket, installs this project, and
runs `vicuna-exp train` on every node with the same overrides plus the node's place in the job
(from SKYPILOT_NODE_RANK / SKYPILOT_NODE_IPS / SKYPILOT_NUM_GPUS_PER_NODE) and a FIXED run dir
inside the bucket. A preempted managed job is relaunched by SkyPilot, finds its checkpoints
in that run dir and resumes (`trainer.resume=auto`). Launch what it writes with:

    sky jobs launch -n NAME outputs/sky/NAME.yaml      # managed: recovers from preemption
    sky launch -c NAME outputs/sky/NAME.yaml           # an interactive cluster

`sky.sweep=NAME` (or `--sweep NAME`) writes one managed job per point of `sweeps/NAME.yaml`.
SkyPilot itself is only needed to launch (`pip install '.[sky]'`), not to write the YAML.
"""

from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path
from typing import Any

from vicuna_exp.choices import LoggerName
from vicuna_exp.errors import EXIT_OK, UsageError
from vicuna_exp.hardware import with_resolved_hardware

# Keys the task sets itself on every node: user overrides of them are dropped (with a note).
_NODE_KEYS = ("launcher.nnodes", "launcher.node_rank", "launcher.nproc_per_node", "launcher.rdzv_endpoint",
              "trainer.resume", "hydra.run.dir")
RDZV_PORT = 29500
_SECRET = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.IGNORECASE)


def _key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def job_name(text: str) -> str:
    """SkyPilot names: lowercase letters, digits and dashes, starting with a letter."""
    name = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return name if name[:1].isalpha() else f"vicuna-{name}"


def passthrough(overrides: list[str]) -> list[str]:
    """The user's overrides the remote `train` must see: not `sky.*`, not Hydra's, not per-node keys."""
    return [o for o in overrides if not _key(o).startswith(("sky.", "hydra.", "hydra/"))
            and _key(o) not in _NODE_KEYS and _key(o) != "sky"]


def run_script(overrides: list[str], run_dir: str, multi_node: bool) -> str:
    """Shell run by SkyPilot on every node: `vicuna-exp train` with this node's rendezvous."""
    node_args = ["launcher.nproc_per_node=$SKYPILOT_NUM_GPUS_PER_NODE", "trainer.resume=auto",
                 f"hydra.run.dir={shlex.quote(run_dir)}"]
    if multi_node:
        node_args[:0] = ["launcher.nnodes=$SKYPILOT_NUM_NODES", "launcher.node_rank=$SKYPILOT_NODE_RANK",
                         f"launcher.rdzv_endpoint=$MASTER_ADDR:{RDZV_PORT}"]
    args = [shlex.quote(o) for o in overrides] + node_args
    lines = ["set -e"]
    if multi_node:
        lines.append('MASTER_ADDR=$(echo "$SKYPILOT_NODE_IPS" | head -n1)')
    lines.append("vicuna-exp train \\\n  " + " \\\n  ".join(args))
    return "\n".join(lines) + "\n"


def task(cfg: Any, overrides: list[str], name: str) -> dict[str, Any]:
    """The SkyPilot task (as a YAML-ready dict) for one composed config."""
    sky, hw, launcher = cfg.sky, cfg.hardware, cfg.launcher
    if not hw.accelerator:
        raise UsageError(f"sky: hardware={hw.name} names no accelerator (hardware.accelerator); "
                         f"choose the cloud GPU, e.g. hardware=a100-80gb (hardware=auto takes the preset's "
                         f"hardware.reference)")
    if not sky.bucket or "://" not in str(sky.bucket):
        raise UsageError("sky.bucket: set the checkpoint bucket URL, e.g. sky.bucket=s3://my-ckpts/vicuna "
                         "(or gs://..., r2://...); checkpoints must outlive a preempted VM")
    nnodes, gpus = int(launcher.nnodes), int(launcher.nproc_per_node)
    run_dir = f"{str(sky.mount).rstrip('/')}/{name}"
    resources: dict[str, Any] = {"accelerators": f"{hw.accelerator}:{gpus}", "use_spot": bool(sky.use_spot),
                                 "disk_size": int(sky.disk_size)}
    if sky.cloud:
        resources["cloud"] = str(sky.cloud)
    if sky.region:
        resources["region"] = str(sky.region)
    if sky.use_spot and int(sky.max_restarts_on_errors) > 0:
        resources["job_recovery"] = {"max_restarts_on_errors": int(sky.max_restarts_on_errors)}
    mounts: dict[str, Any] = {str(sky.mount): {"source": str(sky.bucket), "mode": str(sky.mode)}}
    mounts.update({str(k): str(v) for k, v in sky.file_mounts.items()})
    out: dict[str, Any] = {"name": name, "num_nodes": nnodes, "resources": resources, "workdir": str(sky.workdir),
                           "file_mounts": mounts}
    if sky.envs:
        secret = [k for k, v in sky.envs.items() if _SECRET.search(str(k)) and v not in (None, "")]
        if secret:
            raise UsageError(f"sky.envs.{secret[0]}: a secret would be written into the task YAML; leave its value "
                             f"empty and pass it at launch instead: sky jobs launch --env {secret[0]} ...")
        # An empty value is declared here and filled from the launching shell by `--env NAME`.
        out["envs"] = {str(k): (None if v in (None, "") else str(v)) for k, v in sky.envs.items()}
    out["setup"] = str(sky.setup).rstrip("\n") + "\n"
    out["run"] = run_script(passthrough(overrides), run_dir, multi_node=nnodes > 1)
    return out


def to_yaml(task_dict: dict[str, Any]) -> str:
    """YAML with multi-line shell as literal blocks, so the file reads like the script it runs."""
    import yaml

    class _Dumper(yaml.SafeDumper):
        pass

    def _str(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
        style = "|" if "\n" in data else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)

    _Dumper.add_representer(str, _str)
    return yaml.dump(task_dict, Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def default_name(cfg: Any) -> str:
    return job_name(str(cfg.sky.name or cfg.experiment or f"{cfg.model.name}-{cfg.context.length}"))


def sweep_points(sweep: str) -> tuple[str, list[tuple[list[str], list[str]]]]:
    """(sweep name, [(axis values, overrides)] per point): the product of the axes, each plus `fixed`;
    with `arms`, that product under each arm (the arm's name first among the values)."""
    from vicuna_exp.sweep import load_spec

    spec = load_spec(sweep)
    keys = list(spec.axes)
    points = []
    for arm, arm_overrides in (spec.arms or {None: []}).items():
        for values in itertools.product(*(spec.axes[k] for k in keys)):
            axis = [f"{k}={v}" for k, v in zip(keys, values, strict=True)]
            named = [arm] if arm else []
            points.append(([*named, *(str(v) for v in values)], axis + list(arm_overrides) + list(spec.fixed)))
    return spec.name, points


def write(cfg: Any, overrides: list[str], compose: Any = None) -> list[Path]:
    """Write the task YAML(s) for this config (one per sweep point with `sky.sweep`); return the paths.

    `compose(overrides) -> cfg` composes each sweep point (default: the project's compose).
    Every config is checked by the planner first: a point that does not fit stops the whole write.
    """
    from vicuna_exp.plan import check_fits

    out_dir = Path(str(cfg.sky.output))
    jobs: list[tuple[str, Any, list[str]]] = []
    if cfg.sky.sweep:
        if compose is None:
            from vicuna_exp.hydra_app import compose
        sweep, points = sweep_points(str(cfg.sky.sweep))
        out_dir = out_dir / job_name(sweep)
        for values, point in points:
            swept = {_key(o) for o in point}
            user = [o for o in overrides if _key(o) != "sky.sweep" and _key(o) not in swept]
            name = job_name(f"{cfg.sky.name or sweep}-{'-'.join(values)}")
            jobs.append((name, compose(user + point), user + point))
    else:
        jobs.append((default_name(cfg), cfg, overrides))
    # The task runs on cloud GPUs, not here: hardware=auto means the preset's reference profile.
    jobs = [(name, with_resolved_hardware(job_cfg, on_gpu=None, local=False)[0], job_overrides)
            for name, job_cfg, job_overrides in jobs]
    for _, job_cfg, _ in jobs:
        check_fits(job_cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, job_cfg, job_overrides in jobs:
        path = out_dir / f"{name}.yaml"
        path.write_text(to_yaml(task(job_cfg, job_overrides, name)))
        paths.append(path)
    return paths


def _hydra_overrides() -> list[str]:
    """The command line's overrides, as Hydra recorded them for this job."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        raise UsageError("vicuna-exp sky: run it through the CLI (Hydra records the overrides it passes on)")
    return list(HydraConfig.get().overrides.task)


def main(cfg: Any, overrides: list[str] | None = None) -> int:
    """`vicuna-exp sky [overrides]`: write the task(s) and print how to launch them."""
    overrides = _hydra_overrides() if overrides is None else overrides
    paths = write(cfg, overrides)
    command = "sky jobs launch -n" if cfg.sky.use_spot else "sky launch -c"
    if cfg.logger.name == LoggerName.wandb:  # the key travels from this shell at launch, never through a file
        command = command.replace(" -", " --env WANDB_API_KEY -", 1)
    for path in paths:
        print(f"wrote {path}\n  launch: {command} {path.stem} {path}")
    # launcher.nnodes / nproc_per_node size the resources; these others the task replaces outright
    dropped = [o for o in overrides if _key(o) in _NODE_KEYS[3:] or _key(o) == "launcher.node_rank"]
    if dropped:
        print(f"note: set per node by the task, ignored: {' '.join(dropped)}")
    return EXIT_OK
