"""Build configs for planner tests from the real schema and the real conf/ option files.

Composed with no experiment preset (`~experiment`), so the trainer keys hold the schema's
defaults and the tests pin the planner's arithmetic, not the CPU demo's settings.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from vicuna_exp.hydra_app import compose

# backend.name -> the option whose keys are the planner's assumptions for it
_BACKEND_OPTION = {"single": "single", "ddp": "ddp", "fsdp": "fsdp", "deepspeed": "deepspeed_zero3"}


def make_cfg(model: str = "llama-7b", hardware: str = "a100-80gb", **overrides: object) -> DictConfig:
    """conf/model/MODEL.yaml + conf/hardware/HARDWARE.yaml + context 2048 + the backend option
    named by `backend__name` (default single) + dotted overrides (`trainer__precision=...`)."""
    backend = _BACKEND_OPTION[str(overrides.pop("backend__name", "single"))]
    experiment = overrides.pop("experiment", None)
    nested = {k.replace("__", "."): v for k, v in overrides.items() if isinstance(v, (dict, list))}
    dotted = [f"{k.replace('__', '.')}={'null' if v is None else v}" for k, v in overrides.items()
              if k.replace("__", ".") not in nested]
    cfg = compose(["~experiment", f"model={model}", f"hardware={hardware}", "context=2048", f"backend={backend}",
                   *dotted])
    for key, value in nested.items():
        OmegaConf.update(cfg, key, value, merge=False)
    cfg.experiment = experiment  # the preset's name only, as a run records it
    return cfg
