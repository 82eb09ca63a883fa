"""report.html renders in headless Chromium, offline, without console errors."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from report_sweep_builder import write_job

from vicuna_exp.report import main


def _chromium() -> str | None:
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


CHROMIUM = _chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium on this machine (Debian's `chromium`, installed by .ci/chromium.sh as root): "
           "report.html render test skipped")


def render(page: Path, profile: Path) -> tuple[str, list[str]]:
    """The DOM after scripts ran, and every console message the page produced."""
    assert CHROMIUM is not None
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--dump-dom", page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]
    return proc.stdout, console


def test_report_html_renders_without_console_errors(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    for i, ctx in enumerate(("512", "2048")):
        for j, backend in enumerate(("fsdp", "deepspeed_zero3")):
            write_job(root, f"{2 * i + j}_context={ctx},backend={backend}",
                      [f"context={ctx}", f"backend={backend}"], loss0=3.0 + j, extra_train={"mfu": 0.3})
    broken = write_job(root, "4_broken", ["context=512", "backend=single"])
    (broken / "summary.json").write_text("{")
    assert main([str(root)]) == 0

    dom, console = render(root / "report.html", tmp_path / "profile")
    assert console == []
    assert 'data-sortable="ready"' in dom  # the inline script ran to its end
    assert dom.count('<tr class="status-completed">') == 4
    assert dom.count('<tr class="status-unreadable">') == 1
    assert dom.count('src="data:image/png;base64,') == 3


def test_console_errors_are_detected(tmp_path: Path) -> None:
    """The check above can fail: a page with a script error is caught."""
    page = tmp_path / "bad.html"
    page.write_text("<!DOCTYPE html><html><body><p>x</p><script>notDefined();</script></body></html>")
    _, console = render(page, tmp_path / "profile")
    assert any("Uncaught ReferenceError" in ln for ln in console)


def test_a_search_report_renders_with_its_trials_and_optuna_plots(tmp_path: Path) -> None:
    """A search's report.html: the trials table and the two Optuna plots beside the grid's own."""
    import json

    from optuna.distributions import distribution_to_json

    from vicuna_exp.search import parse_space, space_record

    root = tmp_path / "search"
    space, _ = parse_space(["optim.lr=tag(log, interval(1e-5, 1e-2))"])
    trials = []
    for n, lr in enumerate((1e-4, 1e-3, 3e-3)):
        name = f"optim.lr={lr}"
        write_job(root, name, [name], loss0=3.0 - n / 2)
        trials.append({"number": n, "state": "complete", "value": 2.0 - n / 4, "params": {"optim.lr": lr},
                       "run_dir": name, "error": None})
    best = trials[-1]
    (root / "search.json").write_text(json.dumps({
        "study_name": "s", "storage": str(root / "optuna.journal"), "objective": "best_eval_loss",
        "direction": "minimize", "n_trials": 3, "space": space_record(space),
        "distributions": {k: distribution_to_json(p.distribution()) for k, p in space.items()},
        "trials": trials, "best": best}))
    assert main([str(root)]) == 0

    dom, console = render(root / "report.html", tmp_path / "profile")
    assert console == []
    assert dom.count('data-sortable="ready"') >= 2  # the results and the trials tables
    assert dom.count('src="data:image/png;base64,') == 5  # loss, eval_loss, throughput, history, importances
    assert "Best: trial 2, best_eval_loss 1.5" in dom
