"""Build configs for planner tests from the real schema and the real conf/ option files.

Composed through the schema directly (not Hydra's compose) so the tests pin the planner's
arithmetic, not the state of every other config group.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from vicuna_exp.config import VicunaConfig
from vicuna_exp.plan.config import SkyConfig

CONF = Path(__file__).resolve().parents[2] / "conf"


def make_cfg(model: str = "llama-7b", hardware: str = "a100-80gb", **overrides: object) -> DictConfig:
    """Schema defaults + conf/model/MODEL.yaml + conf/hardware/HARDWARE.yaml + dotted overrides."""
    cfg = OmegaConf.structured(VicunaConfig)
    if "sky" not in cfg:  # until the root schema carries the section
        with open_dict(cfg):
            cfg.sky = OmegaConf.structured(SkyConfig)
    cfg.model = OmegaConf.merge(cfg.model, OmegaConf.load(CONF / "model" / f"{model}.yaml"))
    cfg.hardware = OmegaConf.merge(cfg.hardware, OmegaConf.load(CONF / "hardware" / f"{hardware}.yaml"))
    dotlist = [f"{k.replace('__', '.')}={'null' if v is None else v}" for k, v in overrides.items()]
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotlist))
