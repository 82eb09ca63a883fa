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


# ---------------------------------------------------------------------------------------------
# The tracker never stops training
# ---------------------------------------------------------------------------------------------
def _refused_port() -> int:
    """A loopback port nothing listens on: connections to it are refused at once."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_wandb_server_falls_back_to_offline(tmp_path: Path, monkeypatch, capsys) -> None:
    from vicuna_exp.cli import main

    key = "k" * 40
    monkeypatch.setenv("WANDB_API_KEY", key)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_refused_port()}")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_dir = tmp_path / "run"
    args = ["train", "logger=wandb", "logger.init_timeout_s=2", "trainer.max_steps=2", "trainer.micro_batch_size=2",
            "trainer.global_batch_size=4", "trainer.eval_every_steps=null", "trainer.eval_max_rows=4",
            "trainer.save_final=false", "model.hidden_size=64", "model.intermediate_size=128",
            "model.num_hidden_layers=2", "context=512", f"hydra.run.dir={run_dir}"]
    assert main(args) == 0
    out = capsys.readouterr()
    assert "server cannot be reached" in out.out + out.err and f"vicuna-exp sync {run_dir}" in out.out + out.err
    assert list((run_dir / "wandb").glob("offline-run-*/*.wandb"))  # what `vicuna-exp sync` uploads later
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line] == [1, 2]
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), f"the API key was written to {path}"
    assert main(args) == 0 and "already completed" in capsys.readouterr().out  # the rerun completes


def test_a_later_wandb_error_is_logged_once_and_never_raised(tmp_path: Path, caplog) -> None:
    from omegaconf import OmegaConf

    from vicuna_exp.config import VicunaConfig
    from vicuna_exp.tracking import Tracker

    class Broken:
        calls = 0

        def log(self, *args: object, **kwargs: object) -> None:
            Broken.calls += 1
            raise ConnectionError("server went away")

    cfg = OmegaConf.merge(OmegaConf.structured(VicunaConfig), {"logger": {"name": "none"}})
    tracker = Tracker(cfg, tmp_path, enabled=True, overrides=[], total_steps=3)
    tracker._wandb = Broken()
    for step in (1, 2, 3):
        tracker.log({"step": step, "loss": 1.0})
    tracker.finish(0)
    assert Broken.calls == 1
    assert sum("wandb log failed" in r.getMessage() for r in caplog.records) == 1
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


def test_a_search_trial_puts_its_study_number_and_params_in_the_wandb_config(tmp_path: Path, monkeypatch) -> None:
    import wandb

    from vicuna_exp.hydra_app import compose
    from vicuna_exp.tracking import TRIAL_ENV, Tracker

    seen: dict = {}
    monkeypatch.setattr(wandb, "init", lambda **kwargs: seen.update(kwargs) or object())
    cfg = compose(["logger=wandb", "logger.mode=offline", "logger.group=lr_search-abc123"])
    tracker = Tracker(cfg, tmp_path, enabled=False, overrides=[], total_steps=1)
    monkeypatch.setenv(TRIAL_ENV, json.dumps({"study": "lr_search", "number": 3, "params": {"optim.lr": 1e-4}}))
    tracker._init_wandb(cfg, tmp_path, ["optim.lr=0.0001"], {})
    assert seen["config"]["trial"] == {"study": "lr_search", "number": 3, "params": {"optim.lr": 1e-4}}
    assert seen["group"] == "lr_search-abc123"
    monkeypatch.delenv(TRIAL_ENV)
    tracker._init_wandb(cfg, tmp_path, [], {})
    assert "trial" not in seen["config"]  # a run outside a search has no trial
