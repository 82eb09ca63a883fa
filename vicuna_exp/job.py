"""The Hydra job of `vicuna-exp train`: one run dir per job.

A run dir that already completed with the same config is skipped (`trainer.resume=never` trains it
again); any other is started, or resumed from its latest checkpoint by the recipe. One process
with no sharding trains here; anything else goes to torchrun (`vicuna_exp.launch`), whose ranks
read the resolved config this job saves.

    vicuna-exp train model.path=/path/to/llama-7b-hf                # one job
    vicuna-exp train -m context=512,2048                            # one job per run dir
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from vicuna_exp.checkpoint import CHECKPOINTS_DIR, one_checkpoint_bytes
from vicuna_exp.choices import BackendName, ResumeMode
from vicuna_exp.config import check_method_backend, config_hash, validate
from vicuna_exp.errors import EXIT_OK, EXIT_USAGE, UsageError
from vicuna_exp.hardware import attention_before_launch
from vicuna_exp.launch import launch
from vicuna_exp.preflight import check_run_dir_room, expected_checkpoint_bytes
from vicuna_exp.rundir import RunStatus, Summary, completed_summary, save_resolved_config


def main(cfg: DictConfig) -> int:
    """`vicuna-exp train`: one run dir per job; skip it if already completed, else (re)start it."""
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    overrides = list(hc.overrides.task)
    try:
        validate(cfg)
        check_method_backend(cfg)
        attention_before_launch(cfg)  # a kernel that cannot run here: exit 2 before any worker starts
    except UsageError as e:  # recorded, so a report over a multirun shows why this job did not run
        Summary(status=RunStatus.failed, exit_code=EXIT_USAGE, error=str(e), overrides=overrides,
                config_hash=_hash_if_resolvable(cfg), run_dir=str(run_dir)).write(run_dir)
        raise
    finished = completed_summary(run_dir, config_hash(cfg))
    if finished is not None and cfg.trainer.resume == ResumeMode.auto:
        print(f"already completed: {run_dir} (final_loss {finished.final_loss}); skipping. "
              "Use trainer.resume=never to train it again.")
        return EXIT_OK
    check_run_dir_room(run_dir, one_checkpoint_bytes(run_dir / CHECKPOINTS_DIR, expected_checkpoint_bytes(cfg)))
    save_resolved_config(cfg, run_dir, overrides)
    if needs_torchrun(cfg):
        code = launch(cfg, run_dir)
    else:  # imported only here: transformers and the recipe, 2-3 CPU s that a job launching torchrun never needs
        from vicuna_exp import train

        code = train.run(cfg, run_dir, overrides)[0]
    report_outcome(run_dir, resume_hint(hc, run_dir))
    return code


def needs_torchrun(cfg: DictConfig) -> bool:
    """Several processes, or a sharding backend: those need a process group, even of one, and
    torchrun provides it."""
    return cfg.launcher.nproc_per_node * cfg.launcher.nnodes > 1 or cfg.backend.name != BackendName.single


def report_outcome(run_dir: Path, resume: str = "rerun the same command to resume") -> None:
    """One line a person (or a script) can act on: what happened, where the run dir is, and for an
    interrupted run how to resume it."""
    s = Summary.read(run_dir)
    if s is None:
        return
    losses = ", ".join(f"{name} {value:.4f}" for name, value in
                       (("final_loss", s.final_loss), ("final_eval_loss", s.final_eval_loss)) if value is not None)
    print(f"{s.status.value} after {s.steps} steps{': ' + losses if losses else ''}; run dir: {run_dir}")
    if s.status == RunStatus.interrupted:
        print(resume)


def resume_hint(hc: Any, run_dir: Path) -> str:
    """How to resume this job: the same command finds its run dir again only when the dir was given
    (`hydra.run.dir`, or `hydra.sweep.dir` for a multirun); the default one is named by the clock."""
    from hydra.types import RunMode

    multirun = hc.mode == RunMode.MULTIRUN
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    if key in {o.partition("=")[0].lstrip("+~") for o in hc.overrides.hydra}:
        return "rerun the same command to resume"
    return f"to resume, rerun the same command with {key}={Path(hc.sweep.dir) if multirun else run_dir}"


def _hash_if_resolvable(cfg: DictConfig) -> str | None:
    """The config's hash, or None when an interpolation does not resolve (the error says which)."""
    try:
        return config_hash(cfg)
    except Exception:  # noqa: BLE001 - any resolution failure: the usage error already names it
        return None
