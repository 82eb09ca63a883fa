"""The SkyPilot task writer: resources, bucket, per-node rendezvous, pass-through overrides, sweeps."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml
from plan_helpers import make_cfg

from vicuna_exp import sky
from vicuna_exp.errors import UsageError

USER = ["experiment=vicuna-7b", "model.path=${oc.env:LLAMA_ROOT}/llama-7b-hf", "launcher.nnodes=2",
        "sky.bucket=s3://ckpts/vicuna", "hydra.run.dir=somewhere", "trainer.resume=never", "backend=fsdp"]
# SkyPilot's task schema (sky/utils/schemas.py): the keys this writer may use.
TASK_KEYS = {"name", "num_nodes", "resources", "workdir", "file_mounts", "envs", "setup", "run"}
RESOURCE_KEYS = {"accelerators", "use_spot", "disk_size", "cloud", "region", "job_recovery"}


def _cfg(**over):
    base = dict(backend__name="fsdp", launcher__nproc_per_node=8, launcher__nnodes=2, context__length=2048,
                sky__bucket="s3://ckpts/vicuna", experiment="vicuna-7b", sky__output="unused")
    base.update(over)
    return make_cfg("llama-7b", "a100-80gb", **base)


def test_task_resources_bucket_and_fixed_run_dir():
    t = sky.task(_cfg(), USER, "vicuna-7b")
    assert set(t) <= TASK_KEYS and set(t["resources"]) <= RESOURCE_KEYS
    assert t["num_nodes"] == 2
    assert t["resources"] == {"accelerators": "A100-80GB:8", "use_spot": True, "disk_size": 512}
    assert t["file_mounts"] == {"/checkpoints": {"source": "s3://ckpts/vicuna", "mode": "MOUNT_CACHED"}}
    run = t["run"]
    assert "hydra.run.dir=/checkpoints/vicuna-7b" in run and "trainer.resume=auto" in run
    assert "'model.path=${oc.env:LLAMA_ROOT}/llama-7b-hf'" in run and "experiment=vicuna-7b" in run
    assert "sky.bucket" not in run and "somewhere" not in run and "resume=never" not in run
    assert yaml.safe_load(sky.to_yaml(t)) == t


def test_run_script_gives_each_node_its_rendezvous(tmp_path):
    """Run the generated script under bash with SkyPilot's variables and a stand-in `vicuna-exp`."""
    (tmp_path / "vicuna-exp").write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    (tmp_path / "vicuna-exp").chmod(0o755)
    run = sky.task(_cfg(), USER, "vicuna-7b")["run"]
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", SKYPILOT_NODE_RANK="1",
               SKYPILOT_NODE_IPS="10.1.0.4\n10.1.0.5\n", SKYPILOT_NUM_NODES="2", SKYPILOT_NUM_GPUS_PER_NODE="8")
    args = subprocess.run(["bash", "-c", run], env=env, capture_output=True, text=True, check=True).stdout.split("\n")
    assert "launcher.node_rank=1" in args and "launcher.nnodes=2" in args
    assert "launcher.nproc_per_node=8" in args and "launcher.rdzv_endpoint=10.1.0.4:29500" in args
    assert "model.path=${oc.env:LLAMA_ROOT}/llama-7b-hf" in args  # reaches Hydra unexpanded


def test_single_node_task_has_no_rendezvous_and_on_demand_option():
    t = sky.task(_cfg(launcher__nnodes=1, sky__use_spot=False, sky__cloud="gcp",
                      sky__file_mounts={"/models": "gs://weights/llama"}, sky__envs={"LLAMA_ROOT": "/models"}),
                 ["experiment=vicuna-7b"], "v7")
    assert t["num_nodes"] == 1 and "rdzv_endpoint" not in t["run"]
    assert t["resources"]["use_spot"] is False and t["resources"]["cloud"] == "gcp"
    assert t["file_mounts"]["/models"] == "gs://weights/llama" and t["envs"] == {"LLAMA_ROOT": "/models"}


def test_bad_input():
    with pytest.raises(UsageError, match="sky.bucket"):
        sky.task(_cfg(sky__bucket=None), [], "x")
    with pytest.raises(UsageError, match="hardware=cpu"):
        sky.task(make_cfg("tiny", "cpu", sky__bucket="s3://b"), [], "x")


def test_sweep_writes_one_job_per_point(tmp_path):
    spec = tmp_path / "grid.yaml"
    spec.write_text("description: test grid\naxes:\n  context.length: [512, 2048]\n"
                    "  trainer.micro_batch_size: [1, 2]\nfixed:\n  - trainer.epochs=1\n")

    def compose(overrides):
        return _cfg(**{o.partition("=")[0].replace(".", "__"): o.partition("=")[2]
                       for o in overrides if not o.startswith(("experiment=", "sky.sweep="))})

    cfg = _cfg(sky__sweep=str(spec), sky__output=str(tmp_path / "out"))
    paths = sky.write(cfg, ["sky.bucket=s3://ckpts/vicuna", "context.length=4096", f"sky.sweep={spec}"], compose)
    assert [p.name for p in paths] == ["grid-512-1.yaml", "grid-512-2.yaml", "grid-2048-1.yaml", "grid-2048-2.yaml"]
    assert all(p.parent == tmp_path / "out" / "grid" for p in paths)
    run = yaml.safe_load(paths[2].read_text())["run"]
    assert "context.length=2048" in run and "trainer.micro_batch_size=1" in run and "trainer.epochs=1" in run
    assert "context.length=4096" not in run  # the sweep's axis wins over the user's value
    assert "hydra.run.dir=/checkpoints/grid-2048-1" in run


def test_write_refuses_a_config_that_does_not_fit(tmp_path):
    cfg = _cfg(backend__name="single", launcher__nproc_per_node=1, launcher__nnodes=1,
               sky__output=str(tmp_path))
    with pytest.raises(UsageError, match="does not fit"):
        sky.write(cfg, [])
    assert not list(Path(tmp_path).iterdir())


def test_task_parses_with_skypilot(tmp_path):
    """SkyPilot's own parser, where the optional `sky` extra is installed (it works offline). It is not in
    the dev set: skypilot 0.14.1 pins click<8.2, which breaks wandb 0.31 (click>=8.2) in the same venv."""
    sky_lib = pytest.importorskip("sky", reason="the optional `sky` extra (skypilot) is not installed: its "
                                  "click<8.2 pin conflicts with wandb's click>=8.2, so it stays out of the test venv")
    path = sky.write(_cfg(sky__output=str(tmp_path)), USER)[0]
    task = sky_lib.Task.from_yaml(str(path))
    assert task.num_nodes == 2
    (res,) = task.resources
    assert res.accelerators == {"A100-80GB": 8} and res.use_spot
    assert "/checkpoints" in task.storage_mounts


def test_main_prints_launch_commands(tmp_path, capsys):
    cfg = _cfg(sky__output=str(tmp_path))
    assert sky.main(cfg, USER) == 0
    out = capsys.readouterr().out
    assert f"sky jobs launch --env WANDB_API_KEY -n vicuna-7b {tmp_path}/vicuna-7b.yaml" in out
    assert "ignored: hydra.run.dir=somewhere trainer.resume=never" in out
    assert (tmp_path / "vicuna-7b.yaml").is_file()


def test_a_secret_is_never_written_into_the_task(tmp_path):
    cfg = _cfg(sky__output=str(tmp_path))
    cfg.sky.envs = {"WANDB_API_KEY": "abc123", "LLAMA_ROOT": "/weights"}
    with pytest.raises(UsageError, match="sky.envs.WANDB_API_KEY"):
        sky.main(cfg, USER)
    cfg.sky.envs = {"WANDB_API_KEY": "", "LLAMA_ROOT": "/weights"}
    assert sky.main(cfg, USER) == 0
    text = (tmp_path / "vicuna-7b.yaml").read_text()
    assert "abc123" not in text and "LLAMA_ROOT: /weights" in text
