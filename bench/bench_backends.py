"""Backends side by side: the same tiny run under single, ddp, fsdp, deepspeed_zero2 and
deepspeed_zero3, through the real CLI, in one invocation; prints tokens/s and peak memory per
rank, and each backend's ratio to `single`.

    .venv/bin/python bench/bench_backends.py --steps 12 [--backends single,fsdp,...] [--json out.json]

On a 2-core CPU the sharded backends pay for gloo collectives and run 2 processes on 2 cores,
so the ratios measure overhead, not the speed-up a GPU node gives; the final losses show that
every backend trains the same model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ALL = ["single", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"]
COMMON = ["logger=none", "trainer.micro_batch_size=2", "trainer.global_batch_size=4", "trainer.eval_every_steps=null",
          "trainer.save_every_steps=null", "trainer.save_final=false", "model.hidden_size=256",
          "model.intermediate_size=688", "model.num_hidden_layers=4", "context=512"]


def run(backend: str, steps: int, out: Path) -> dict:
    nproc = 1 if backend == "single" else 2
    cmd = [sys.executable, "-m", "vicuna_exp", "train", *COMMON, f"backend={backend}",
           f"launcher.nproc_per_node={nproc}", f"trainer.max_steps={steps}", f"hydra.run.dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "2" if nproc == 1 else "1"}
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r][2:]  # the first steps include warm-up (allocations, op loads)
    tokens = sum(r["tokens_per_s"] * r["step_s"] for r in train)
    secs = sum(r["step_s"] for r in train)
    summary = json.loads((out / "summary.json").read_text())
    return {"backend": backend, "processes": nproc, "tokens_per_s": tokens / secs, "step_s": secs / len(train),
            "peak_mem_gb_rank0": max(r.get("peak_mem_gb", 0) for r in train), "final_loss": summary["final_loss"],
            "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--backends", default=",".join(ALL))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for b in args.backends.split(","):
            results.append(run(b, args.steps, Path(tmp) / b))
            print(f"  {b}: done", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}\n")
    base = next((r for r in results if r["backend"] == "single"), results[0])
    print(f"{'backend':<17}{'procs':>6}{'tokens/s':>10}{'vs single':>10}{'s/step':>8}{'RSS GB r0':>10}"
          f"{'final loss':>12}{'wall s':>8}")
    for r in results:
        print(f"{r['backend']:<17}{r['processes']:>6}{r['tokens_per_s']:>10.0f}"
              f"{r['tokens_per_s'] / base['tokens_per_s']:>9.2f}x{r['step_s']:>8.2f}{r['peak_mem_gb_rank0']:>10.2f}"
              f"{r['final_loss']:>12.5f}{r['wall_s']:>8.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
