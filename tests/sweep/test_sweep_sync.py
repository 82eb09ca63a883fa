"""`vicuna-exp sync`: finds a sweep's offline wandb runs; refuses cleanly without a key (no network)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from vicuna_exp import sync
from vicuna_exp.sync import find_offline_runs, main
from vicuna_exp.tracking import wandb_key_configured


def _offline_run(job: Path, run_id: str, synced: bool = False) -> Path:
    run = job / "wandb" / f"offline-run-20250101_120000-{run_id}"
    run.mkdir(parents=True)
    (run / f"run-{run_id}.wandb").write_bytes(b"\x00log")
    if synced:
        (run / f"run-{run_id}.wandb.synced").write_text("")
    return run


@pytest.fixture()
def sweep_dir(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    _offline_run(root / "context=512", "aaa")
    _offline_run(root / "context=2048", "bbb")
    _offline_run(root / "context=4096", "ccc", synced=True)
    (root / "context=8192" / "wandb" / "offline-run-20250101_120000-ddd").mkdir(parents=True)  # never logged
    (root / "context=512" / "wandb" / "run-20250101_120000-eee").mkdir()  # an online run: already uploaded
    return root


@pytest.fixture()
def no_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_IDENTITY_TOKEN_FILE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "absent-netrc"))


def test_finds_pending_and_synced_offline_runs(sweep_dir: Path) -> None:
    pending, done = find_offline_runs(sweep_dir)
    assert [p.name for p in pending] == ["offline-run-20250101_120000-bbb", "offline-run-20250101_120000-aaa"]
    assert [p.name for p in done] == ["offline-run-20250101_120000-ccc"]


def test_without_a_key_refuses_with_exit_2(sweep_dir: Path, no_key: None, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("must not call wandb without a key"))
    assert not wandb_key_configured()
    assert main([str(sweep_dir)]) == 2
    out, err = capsys.readouterr()
    assert "2 offline wandb run(s) to upload" in out
    assert "no wandb API key configured" in err and "WANDB_API_KEY" in err


def test_key_in_netrc_is_found(tmp_path: Path, no_key: None, monkeypatch: pytest.MonkeyPatch) -> None:
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc_file.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc_file))
    assert wandb_key_configured()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")  # a key for another host does not count
    assert not wandb_key_configured()


def test_with_a_key_hands_only_pending_runs_to_wandb_sync(sweep_dir: Path, no_key: None,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], check: bool = False) -> subprocess.CompletedProcess:
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(sync.subprocess, "run", fake_run)
    assert main([str(sweep_dir), "--project", "vicuna-exp"]) == 0
    (cmd,) = calls
    i = cmd.index("sync")
    assert cmd[i + 1:i + 3] == ["--project", "vicuna-exp"]
    assert sorted(Path(p).name for p in cmd[i + 3:]) == ["offline-run-20250101_120000-aaa",
                                                        "offline-run-20250101_120000-bbb"]

    monkeypatch.setattr(sync.subprocess, "run", lambda cmd, check=False: subprocess.CompletedProcess(cmd, 1))
    assert main([str(sweep_dir)]) == 1


def test_nothing_to_upload_and_bad_path(tmp_path: Path, no_key: None) -> None:
    assert main([str(tmp_path)]) == 0
    assert main([str(tmp_path / "missing")]) == 2
