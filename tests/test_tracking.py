"""wandb never hangs for lack of a key, and metrics.jsonl stays consistent across resumes."""

from __future__ import annotations

import json
from pathlib import Path

from vicuna_exp.tracking import resolve_wandb_mode, run_name, wandb_key_configured


def test_offline_without_a_key(tmp_path: Path) -> None:
    env = {"NETRC": str(tmp_path / "missing")}
    assert not wandb_key_configured(env)
    assert resolve_wandb_mode("auto", env) == "offline"


def test_online_with_a_key_in_the_environment() -> None:
    assert resolve_wandb_mode("auto", {"WANDB_API_KEY": "x" * 40}) == "online"


def test_online_with_a_netrc_login(tmp_path: Path) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    assert resolve_wandb_mode("auto", {"NETRC": str(netrc)}) == "online"


def test_explicit_modes_win(tmp_path: Path) -> None:
    assert resolve_wandb_mode("disabled", {"WANDB_API_KEY": "k"}) == "disabled"
    assert resolve_wandb_mode("auto", {"WANDB_MODE": "offline", "WANDB_API_KEY": "k"}) == "offline"


def test_run_name_from_overrides() -> None:
    assert run_name([]) == "default"
    assert run_name(["context=2048", "logger.group=x", "hydra.run.dir=/tmp", "backend=fsdp"]) == "context=2048,backend=fsdp"


def test_resume_truncates_lines_after_the_checkpoint(tmp_path: Path) -> None:
    from vicuna_exp.hydra_app import compose
    from vicuna_exp.tracking import Tracker

    cfg = compose(["logger=none"])
    lines = [{"step": s, "loss": 1.0 / s} for s in range(1, 6)] + [{"step": 4, "eval_loss": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 6, "lo')
    tracker = Tracker(cfg, tmp_path, enabled=True, overrides=[], total_steps=10, start_step=3)
    tracker.log({"step": 4, "loss": 0.1})
    tracker.finish(0)
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
