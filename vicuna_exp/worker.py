"""What torchrun runs on every rank: `python -m vicuna_exp.worker RUN_DIR`.

No Hydra here: the rank reads the config the Hydra job resolved and saved in RUN_DIR, so every
rank trains exactly the same config and writes into the same run dir (rank 0 alone writes
metrics, summary and wandb). Each rank leaves `RUN_DIR/.workers/rank_<r>.json` (its exit code and
error) for the job, which turns them into the job's exit code and summary.

A rank that stopped cleanly (completed, or interrupted with a checkpoint: code 75) exits 0 to
torchrun: torchrun treats any other code as a failure and would kill the ranks still finishing
their summary. Failures keep their code, so torchrun stops the others at once; so does a full
disk, even when resumable (75), since the other ranks may be waiting for this one in a collective.
Each rank also keeps a heartbeat (`vicuna_exp.heartbeat`) for the job's stall watch.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from vicuna_exp import heartbeat
from vicuna_exp.diskspace import DiskFull
from vicuna_exp.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, UsageError
from vicuna_exp.launch import set_parent_death_signal
from vicuna_exp.rundir import WORKER_STATUS_DIR, load_resolved_config
from vicuna_exp.tracking import write_json_atomic
from vicuna_exp.train import run


def write_status(run_dir: Path, rank: int, code: int, error: str | None) -> None:
    folder = run_dir / WORKER_STATUS_DIR
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / f"rank_{rank}.json",
                          {"rank": rank, "exit_code": code, "error": error, "pid": os.getpid(), "time": time.time()})
    except OSError as e:  # a full disk: the job then sees a rank that ended without a status
        print(f"rank {rank}: status not written ({e}); it ended with: {error or code}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m vicuna_exp.worker RUN_DIR", file=sys.stderr)
        return EXIT_USAGE
    set_parent_death_signal(signal.SIGTERM)  # torchrun gone (even SIGKILLed): stop cleanly, do not linger
    run_dir = Path(args[0])
    rank = int(os.environ.get("RANK", 0))
    heartbeat.start(run_dir, rank)
    logging.basicConfig(level=logging.INFO, format=f"[rank{rank}] %(levelname)s %(name)s: %(message)s")
    code, error = EXIT_FAILED, None
    try:
        cfg, overrides = load_resolved_config(run_dir)
        code, error = run(cfg, run_dir, overrides)
    except UsageError as e:
        code, error = EXIT_USAGE, str(e)
        print(f"error: {e}", file=sys.stderr)
    except BaseException as e:  # noqa: BLE001 - recorded for the job, then re-raised as an exit code
        code, error = EXIT_FAILED, f"{type(e).__name__}: {e}"
        traceback.print_exc()
    finally:
        write_status(run_dir, rank, code, error)
        heartbeat.beat(heartbeat.DONE)
    if DiskFull.said(error):
        return EXIT_FAILED
    return EXIT_OK if code in (EXIT_OK, EXIT_INTERRUPTED) else code


if __name__ == "__main__":
    sys.exit(main())
