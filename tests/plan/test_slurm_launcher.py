"""The SLURM launcher configs compose with hydra-submitit-launcher and give the sbatch script we mean."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[2] / "conf"


def _sbatch(tmp_path: Path, monkeypatch, option: str, overrides: list[str]) -> str:
    """Compose `hydra/launcher=OPTION` over a stub primary config, then build the sbatch script the
    way the plugin's launch() does (executor keys, parameter prefixes) without a cluster."""
    from hydra import compose, initialize_config_dir
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    conf = tmp_path / "conf"
    shutil.copytree(CONF / "hydra", conf / "hydra")
    (conf / "config.yaml").write_text("launcher:\n  nnodes: 2\n  nproc_per_node: 8\n")
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={option}", *overrides], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    # ${launcher.*} interpolations resolve against the job config, as at launch time
    for key in ("nodes", "gpus_per_node"):
        assert str(params[key]).startswith("${launcher.")
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params.pop("_target_").endswith("SlurmLauncher")
    params.pop("submitit_folder")
    (tmp_path / "bin").mkdir()
    srun = tmp_path / "bin" / "srun"
    srun.write_text("#!/bin/sh\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{Path('/usr/bin')}:{Path('/bin')}")
    import submitit

    executor = submitit.AutoExecutor(folder=tmp_path / "sub", cluster="slurm",
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    return executor._executor._make_submission_file_text("python -u -m submitit.core._submit x", "uid")


def test_slurm_launcher_one_task_per_node_with_gpus_and_warning(tmp_path, monkeypatch):
    text = _sbatch(tmp_path, monkeypatch, "slurm", ["hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=600",
                                                    "launcher.nnodes=4"])
    assert "#SBATCH --nodes=4" in text
    assert "#SBATCH --gpus-per-node=8" in text
    assert "#SBATCH --ntasks-per-node=1" in text
    assert "#SBATCH --cpus-per-task=32" in text
    assert "#SBATCH --partition=gpu" in text
    assert "#SBATCH --time=600" in text
    assert "#SBATCH --signal=USR" in text and "@120" in text
    assert "--requeue" not in text


def test_preemptible_launcher_asks_slurm_to_requeue(tmp_path, monkeypatch):
    text = _sbatch(tmp_path, monkeypatch, "slurm_preemptible", [])
    assert "#SBATCH --requeue" in text and "#SBATCH --nodes=2" in text


@pytest.mark.parametrize("name", ["slurm", "slurm_preemptible"])
def test_launcher_files_only_hold_plugin_keys(name):
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

    keys = set(OmegaConf.load(CONF / "hydra" / "launcher" / f"{name}.yaml").keys()) - {"defaults"}
    assert keys <= set(OmegaConf.structured(SlurmQueueConf).keys())
