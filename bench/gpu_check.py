"""One command that says whether vicuna-exp works on a GPU, and how fast: `make gpu-check`.

    PYTHONPATH=. python3 bench/gpu_check.py --out outputs/gpu_check          # on a GPU, about 5 minutes
    PYTHONPATH=. python3 bench/gpu_check.py --parts env,throughput --out DIR  # some parts only
    PYTHONPATH=. python3 bench/gpu_check.py --dry-run --out DIR               # the same parts on the CPU

Parts, in order of value; each runs in a process of its own (`bench/gpu_check_parts.py`), so a
hang or a CUDA fault stays inside it and this process never creates a CUDA context:

1. env: torch, CUDA, driver, GPU name and memory, bf16, the attention kernels that can run, and
   that every module a run needs imports.
2. correctness: packed rows against the same examples unpacked, loss and gradients, per attention
   kernel, in bf16 and (where the kernel allows) fp32, through the recipe's own collate and loss.
3. throughput: a ~1B LLaMA (hidden 2048, MLP 5504, 16 layers, 16 heads, vocab 32,000), context 2048,
   packed sample rows, bf16_mixed, micro-batch 4, per kernel with checkpointing off and on: 3 warm-up
   and 8 timed steps of the recipe's `train_step`. Tokens/s; MFU against the hardware profile's dense
   peak and against a bf16 matmul peak measured in the same process; peak reserved memory against
   the planner's prediction for the same config.
4. e2e: `vicuna-exp train` for 10 steps with a checkpoint at step 5, SIGKILLed after it, then the
   same command again: it must resume at step 5 and repeat the killed run's losses.
5. fsdp: one rank under torchrun over nccl, accumulating 2 micro-batches.
6. deepspeed: ZeRO-3 with one rank; the JIT ops it loads are built first, timed on their own and
   limited to 150 s.

Each part has its own timeout (`--timeout PART=SECONDS`) inside one budget for the whole check
(`--budget-s`, 300 by default): a part that would start with less than 10 s left is not run. The
dry run's limits (600 s a part, 1800 s in all) only catch a hang on a busy CI machine. On a GPU the
parts run one at a time, since they time kernels on the one device; the dry run's have nothing to
time and run two at a time (`--jobs`), which halves its wall time on two cores, with torch.compile
off (flex attention runs unfused: the same answer, without half a minute of tracing).
`gpu_check.json` and `gpu_check.md` in `--out` are rewritten after every part, so a run cut short
still reports. Exit 0 when every part passed, 1 when any failed or was not run, 2 for bad usage
(no GPU without `--dry-run`, an unknown part).

On a machine without the project installed: torch 2.11-2.13 and transformers 5.17-5.23 from the
machine, the rest from wheels carried beside the checkout in `.whl/`. For the lent H200 image
(Python 3.12), these are the wheels its package list lacks, found by following each wheel's
Requires-Dist against that list (BENCHMARKS.md's GPU section gives the derivation), fetched here:

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \\
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \\
        hydra-core==1.3.8 omegaconf==2.3.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0 \\
        orjson==3.13.0 markdownify==1.2.3 beautifulsoup4==4.15.0 soupsieve==4.1.2 hjson==3.1.0 \\
        pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 \\
        typing_extensions==4.16.0
    # sdist only: built here, by a python that has torch (deepspeed's setup imports it); pure-python wheels
    .venv/bin/python -m pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.8 antlr4-python3-runtime==4.9.3

and run there:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:. python3 bench/gpu_check.py --out $OUT
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gpu_check_parts import PARTS  # beside this script, which Python puts first on the path

ROOT = Path(__file__).resolve().parent.parent
PARTS_SCRIPT = ROOT / "bench" / "gpu_check_parts.py"
JSON_FILE, MD_FILE = "gpu_check.json", "gpu_check.md"
DEFAULT_BUDGET_S = 300.0
# Each part's own limit; the budget left caps it too. deepspeed: a 150 s op build, then the run.
PART_TIMEOUT_S = {"env": 90.0, "correctness": 150.0, "throughput": 300.0, "e2e": 180.0, "fsdp": 150.0,
                  "deepspeed": 330.0}
# The dry run's limits are for a shared CI machine, where a minute of work can take several: they
# catch a hang, not slowness.
DRY_RUN_BUDGET_S = 1800.0
DRY_RUN_TIMEOUT_S = 600.0
MIN_START_S = 10.0
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class Usage(Exception):
    """Bad usage: one line on stderr, exit 2."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "gpu_check", help="where the reports go")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, by name or number (1-6): {','.join(PARTS)}")
    p.add_argument("--dry-run", action="store_true", help="the same parts on the CPU, tiny model, few steps")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"the whole check's time limit (default {DEFAULT_BUDGET_S:.0f}; {DRY_RUN_BUDGET_S:.0f} dry)")
    p.add_argument("--timeout", action="append", default=[], metavar="PART=SECONDS", help="one part's time limit")
    p.add_argument("--jobs", type=int, default=None,
                   help="parts run at once (default: 1 on a GPU, whose parts time kernels; 2 in the dry run)")
    return p.parse_args(argv)


def selected_parts(spec: str) -> list[str]:
    chosen = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        name = PARTS[int(item) - 1] if item.isdigit() and 1 <= int(item) <= len(PARTS) else item
        if name not in PARTS:
            raise Usage(f"--parts: unknown part {item!r}; choose from {', '.join(PARTS)} (or 1-{len(PARTS)})")
        if name not in chosen:
            chosen.append(name)
    if not chosen:
        raise Usage("--parts: no part selected")
    return [p for p in PARTS if p in chosen]  # always in order of value


def part_timeouts(items: list[str], dry_run: bool) -> dict[str, float]:
    limits = {name: DRY_RUN_TIMEOUT_S for name in PARTS} if dry_run else dict(PART_TIMEOUT_S)
    for item in items:
        name, _, value = item.partition("=")
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if name not in PARTS or seconds <= 0:
            raise Usage(f"--timeout {item}: expected PART=SECONDS with PART one of {', '.join(PARTS)}")
        limits[name] = seconds
    return limits


def gpu_count() -> int:
    """GPUs visible here, asked of the driver (nvidia-smi) or of torch in a child process: this
    process never creates a CUDA context."""
    try:
        from vicuna_exp.hardware import probe_gpus
    except ImportError as e:
        raise Usage(f"{e}: run from the checkout's root with PYTHONPATH=., and install the wheels this "
                    "script's docstring lists (BENCHMARKS.md, GPU check)") from None
    found = probe_gpus()
    if found is not None:
        return found.count
    try:
        done = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                              capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        raise Usage(f"{sys.executable} cannot be asked for its GPUs: {e}") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise Usage(f"{sys.executable} cannot import torch ({last}); run with a python that has torch 2.11-2.13")
    return int(done.stdout.split()[-1])


def child_env(out: Path, dry_run: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("WANDB_MODE", "offline")
    env.setdefault("WANDB_SILENT", "true")
    env.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; a GPU machine may have no network
    env.setdefault("VICUNA_EXP_CACHE", str(out / "cache"))
    if dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU even on a GPU machine
        # Tracing transformers' compiled flex mask and kernel is half the dry run's correctness part
        # on a CPU (18 of 33 s); unfused, flex gives the same packed-vs-unpacked answer. The GPU run
        # compiles, and tests/data/test_data_packing.py checks compiled flex forward on the CPU.
        env.setdefault("TORCHDYNAMO_DISABLE", "1")
    return env


def run_part(name: str, out: Path, dry_run: bool, timeout: float, env: dict[str, str]) -> dict[str, Any]:
    """Run one part in its own process (group), to its end or its timeout, and read its report."""
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    result, log = folder / "result.json", folder / "part.log"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(PARTS_SCRIPT), name, "--out", str(out), "--result", str(result)]
    if dry_run:
        cmd.append("--dry-run")
    t0 = time.monotonic()
    with log.open("wb") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        rc, cpu_s, timed_out = _wait(proc, t0 + timeout)
    seconds = round(time.monotonic() - t0, 1)
    try:
        report = json.loads(result.read_text())
    except (OSError, json.JSONDecodeError):
        report = {"part": name, "checks": [], "skipped": [], "results": {}, "error": None}
    if timed_out:
        report["error"] = f"timed out after {seconds:.0f} s (limit {timeout:.0f} s); what it found so far is kept"
    elif rc != 0 and not report.get("error"):
        report["error"] = f"the part's process exited {rc}"
    report.update(seconds=seconds, cpu_s=round(cpu_s, 1), timeout_s=round(timeout, 1),
                  status=status_of(report))
    if report["status"] == "failed":
        report["log_tail"] = log.read_text(errors="replace")[-3000:]
    report["log"] = str(log)
    return report


def _wait(proc: subprocess.Popen, deadline: float) -> tuple[int, float, bool]:
    """Wait for a part to its end or the deadline (then kill its process group): its exit code, the
    CPU seconds of the part and of every process it waited for (wait4's own count, so parts that
    run at once are told apart), and whether it timed out."""
    timed_out = False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() >= deadline:
            timed_out = True
            os.killpg(proc.pid, 9)  # the part and whatever it started (torchrun, its ranks)
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.1)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    return proc.returncode, usage.ru_utime + usage.ru_stime, timed_out


def status_of(report: dict[str, Any]) -> str:
    if report.get("error") or any(not c["ok"] for c in report["checks"]):
        return "failed"
    return "passed" if report["checks"] else "skipped"


def write_reports(out: Path, state: dict[str, Any]) -> None:
    for name, text in ((JSON_FILE, json.dumps(state, indent=1, default=str)), (MD_FILE, render_md(state))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


def render_md(state: dict[str, Any]) -> str:
    """The same findings for a person: one section per part, the figures as tables."""
    verdict = {True: "PASSED", False: "FAILED", None: "running"}[state["passed"]]
    lines = [f"# GPU check{' (dry run, CPU)' if state['dry_run'] else ''}: {verdict}", "",
             f"Started {state['started_at']}, {state['elapsed_s']:.0f} s of a {state['budget_s']:.0f} s budget.", ""]
    for part in state["parts"]:
        lines += [f"## {part['index']}. {part['part']}: {part['status']} ({part.get('seconds', 0):.1f} s, "
                  f"{part.get('cpu_s', 0):.1f} CPU s)", ""]
        if part.get("error"):
            lines += [f"Error: {part['error']}", ""]
        if part["checks"]:
            lines += ["| check | ok | detail |", "|---|---|---|"]
            lines += [f"| {c['name']} | {'yes' if c['ok'] else 'NO'} | {_cell(c['detail'])} |" for c in part["checks"]]
            lines.append("")
        lines += [f"- skipped: {s['what']}: {s['reason']}" for s in part["skipped"]]
        lines += _figures_md(part) + [""]
    return "\n".join(lines)


def _figures_md(part: dict[str, Any]) -> list[str]:
    res = part.get("results") or {}
    if part["part"] == "env":
        return [f"- {k}: {json.dumps(res[k], default=str)}" for k in ("versions", "device", "hardware_profile") if k in res]
    if part["part"] == "correctness" and res.get("cases"):
        rows = ["| kernel | dtype | loss packed | loss unpacked | loss rel. err | grad rel. err |", "|---|---|---|---|---|---|"]
        for c in res["cases"]:
            grad = f"{c['grad_rel_err']:.2e}" if "grad_rel_err" in c else "forward only"
            rows.append(f"| {c['kernel']} | {c['dtype']} | {c['loss_packed']:.6f} | {c['loss_unpacked']:.6f} | "
                        f"{c['loss_rel_err']:.2e} | {grad} |")
        return rows
    if part["part"] == "throughput" and res.get("runs"):
        rows = [f"Measured bf16 matmul peak: {res.get('matmul_bf16_tflops')} TFLOP/s ({res.get('matmul')}).", "",
                "| config | tokens/s | step s (median) | TFLOP/s | MFU (profile) | MFU (measured peak) | "
                "peak reserved GiB | plan GiB (w/o context) | measured/plan |", "|---|---|---|---|---|---|---|---|---|"]
        for r in res["runs"]:
            if "error" in r:
                rows.append(f"| {r['config']} | error: {r['error'][:120]} | | | | | | | |")
                continue
            rows.append(f"| {r['config']} | {r['tokens_per_s']:,.0f} | {r['step_s_median']:.3f} | "
                        f"{r['tflops_per_device']:.3g} | {_pct(r['mfu_profile'])} | {_pct(r['mfu_measured_peak'])} | "
                        f"{r['peak_reserved_gib']:.2f} | {r['predicted_allocator_gib']:.2f} | "
                        f"{_ratio(r.get('measured_over_predicted'))} |")
        return rows
    keys = ("killed_after_step", "resumed_losses", "summary", "op_build_s", "op_build", "ops", "ops_built_during_the_run",
            "largest_relative_loss_difference_vs_single")
    return [f"- {k}: {json.dumps(res[k], default=str)}" for k in keys if k in res]


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _cell(text: str) -> str:
    """Text that stays inside one cell of a Markdown table."""
    return " ".join(str(text).replace("|", "/").split())


def _ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def run_parts(parts: list[str], jobs: int, budget_s: float, limits: dict[str, float], out: Path, dry_run: bool,
              env: dict[str, str], t0: float) -> Iterator[tuple[int, dict[str, Any]]]:
    """Each part's (index, report) as it finishes, `jobs` parts at a time, in order of value; a
    part that would start with less than MIN_START_S of the budget left is not run."""
    pending, running = list(parts), {}
    with cf.ThreadPoolExecutor(max_workers=jobs) as pool:
        while pending or running:
            while pending and len(running) < jobs:
                name = pending.pop(0)
                left = budget_s - (time.monotonic() - t0)
                if left < MIN_START_S:
                    yield PARTS.index(name) + 1, {
                        "part": name, "checks": [], "skipped": [], "results": {}, "status": "not run",
                        "error": f"not run: {max(left, 0):.0f} s of the {budget_s:.0f} s budget left (--budget-s)"}
                    continue
                running[pool.submit(run_part, name, out, dry_run, min(limits[name], left), env)] = name
            if not running:
                continue
            done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for future in done:
                yield PARTS.index(running.pop(future)) + 1, future.result()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        parts, limits = selected_parts(args.parts), part_timeouts(args.timeout, args.dry_run)
        if args.budget_s is None:
            args.budget_s = DRY_RUN_BUDGET_S if args.dry_run else DEFAULT_BUDGET_S
        if args.budget_s <= 0:
            raise Usage(f"--budget-s {args.budget_s:g}: must be > 0")
        if args.jobs is not None and args.jobs < 1:
            raise Usage(f"--jobs {args.jobs}: must be >= 1")
        if not args.dry_run and gpu_count() == 0:
            raise Usage("no GPU is visible here (nvidia-smi and torch find none); run with --dry-run to check on the CPU")
    except Usage as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return EXIT_USAGE
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = child_env(out, args.dry_run)
    t0 = time.monotonic()
    state: dict[str, Any] = {"dry_run": args.dry_run, "started_at": dt.datetime.now(dt.timezone.utc).isoformat(
        timespec="seconds"), "argv": sys.argv[1:] if argv is None else argv, "budget_s": args.budget_s,
        "elapsed_s": 0.0, "passed": None, "parts": []}
    jobs = args.jobs or (2 if args.dry_run else 1)
    for index, report in run_parts(parts, jobs, args.budget_s, limits, out, args.dry_run, env, t0):
        state["parts"] = sorted([*state["parts"], {"index": index, **report}], key=lambda p: p["index"])
        state["elapsed_s"] = round(time.monotonic() - t0, 1)
        write_reports(out, state)
        print(f"[{index}/{len(PARTS)}] {report['part']}: {report['status']} ({report.get('seconds', 0):.1f} s, "
              f"{report.get('cpu_s', 0):.1f} CPU s)"
              + (f": {report['error']}" if report.get("error") else ""), flush=True)
    state["passed"] = all(p["status"] in ("passed", "skipped") for p in state["parts"])
    write_reports(out, state)
    print(f"gpu_check: {'passed' if state['passed'] else 'FAILED'} in {state['elapsed_s']:.0f} s; "
          f"{out / JSON_FILE}, {out / MD_FILE}")
    return EXIT_OK if state["passed"] else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
