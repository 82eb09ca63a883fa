"""`vicuna-exp sync SWEEP_DIR`: upload a sweep's offline wandb runs once an API key exists.

Jobs log to wandb offline when no key is configured (never a hang), so a sweep run on an
air-gapped cluster leaves `JOB/wandb/offline-run-*` behind; this command hands exactly those to
`wandb sync`, skipping runs it already uploaded (wandb's `.wandb.synced` marker).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from vicuna_exp.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, UsageError
from vicuna_exp.tracking import wandb_key_configured


def find_offline_runs(sweep_dir: Path) -> tuple[list[Path], list[Path]]:
    """(to upload, already uploaded) offline run dirs under `sweep_dir`, in path order."""
    pending: list[Path] = []
    done: list[Path] = []
    for run in sorted(sweep_dir.rglob("offline-run-*")):
        if not run.is_dir() or run.parent.name != "wandb":
            continue
        logs = sorted(run.glob("*.wandb"))
        if not logs:
            continue  # wandb never got as far as writing its transaction log
        synced = all(log.with_suffix(".wandb.synced").exists() for log in logs)
        (done if synced else pending).append(run)
    return pending, done


def _wandb_command() -> list[str]:
    exe = Path(sys.executable).with_name("wandb")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "wandb"]


def sync(sweep_dir: Path, project: str | None = None, entity: str | None = None, dry_run: bool = False) -> int:
    if not sweep_dir.is_dir():
        raise UsageError(f"SWEEP_DIR {sweep_dir}: not a directory")
    pending, done = find_offline_runs(sweep_dir)
    if done:
        print(f"{len(done)} offline run(s) already uploaded; skipping them")
    if not pending:
        print(f"no offline wandb runs to upload under {sweep_dir}")
        return EXIT_OK
    print(f"{len(pending)} offline wandb run(s) to upload:")
    for run in pending:
        print(f"  {run.relative_to(sweep_dir)}")
    if not wandb_key_configured():
        raise UsageError("no wandb API key configured: set WANDB_API_KEY or run `wandb login`, "
                         f"then run `vicuna-exp sync {sweep_dir}` again (nothing was uploaded)")
    cmd = _wandb_command() + ["sync"]
    if project:
        cmd += ["--project", project]
    if entity:
        cmd += ["--entity", entity]
    if dry_run:
        cmd.append("--dry-run")
    cmd += [str(p) for p in pending]
    result = subprocess.run(cmd, check=False)
    if result.returncode != 0:
        print(f"wandb sync failed with exit code {result.returncode}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="vicuna-exp sync",
        description="Upload the offline wandb runs of a sweep (or of one run dir) once an API key exists.")
    parser.add_argument("sweep_dir", type=Path, metavar="SWEEP_DIR")
    parser.add_argument("--project", help="upload into this wandb project instead of the one each run recorded")
    parser.add_argument("--entity", help="upload into this wandb entity")
    parser.add_argument("--dry-run", action="store_true", help="let wandb list what it would upload, upload nothing")
    args = parser.parse_args(argv)
    try:
        return sync(args.sweep_dir, project=args.project, entity=args.entity, dry_run=args.dry_run)
    except UsageError as e:
        print(f"vicuna-exp sync: error: {e}", file=sys.stderr)
        return EXIT_USAGE
