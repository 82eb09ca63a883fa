"""The six parts of `bench/gpu_check.py`, each run in a process of its own by that script.

    PYTHONPATH=. python3 bench/gpu_check_parts.py PART --out DIR --result FILE [--dry-run]

A part writes its report (checks, skips with their reasons, figures) to FILE after every step, so
a part that is killed at its timeout still says how far it got. Parts 1-3 train in this process
through the project's own `Recipe` (set-up, collate, `train_step`); parts 4-6 drive the real CLI in
child processes and import no torch themselves. `--dry-run` runs the same code on the CPU with a
tiny model and a few steps; what a CPU cannot run (nccl, torch's varlen attention, flex attention's
backward) is skipped with its reason.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("env", "correctness", "throughput", "e2e", "fsdp", "deepspeed")
OP_BUILD_LIMIT_S = 150.0
# Packed against unpacked, (loss, gradient) relative tolerances by compute dtype. The loss is
# relative to its value, the gradient is the L2 norm of the difference over the L2 norm.
TOLERANCE = {"fp32": (1e-5, 1e-4), "bf16": (2e-2, 5e-2)}
# Resumed steps against the same steps of the killed run: by the precision the run resolved to.
RESUME_TOLERANCE = {"fp32": 1e-5, "bf16_mixed": 1e-2, "bf16": 1e-2}
# Attention kernels outside the schema that the design's `auto` order names (torch's own kernels).
TORCH_NATIVE_ATTENTION = ("flex_attention", "varlen")


@dataclass(frozen=True)
class Sizes:
    """How big each part runs: the GPU sizes the issue names, or the dry run's CPU ones."""

    correctness_context: int
    correctness_rows: int  # packed rows of several examples each
    throughput_model: tuple[str, ...]  # overrides of model=tiny
    throughput_context: int
    throughput_micro_batch: int
    throughput_precision: str
    warmup_steps: int
    timed_steps: int
    matmul_n: int
    cli_context: int
    cli_micro_batch: int
    cli_steps: int
    cli_save_at: int
    cli_poll_s: float


GPU_SIZES = Sizes(
    correctness_context=2048, correctness_rows=2,
    throughput_model=("model.hidden_size=2048", "model.intermediate_size=5504", "model.num_hidden_layers=16",
                      "model.num_attention_heads=16", "model.num_key_value_heads=16", "model.vocab_size=32000"),
    throughput_context=2048, throughput_micro_batch=4, throughput_precision="bf16_mixed", warmup_steps=3, timed_steps=8, matmul_n=8192,
    cli_context=2048, cli_micro_batch=4, cli_steps=10, cli_save_at=5, cli_poll_s=0.01)
DRY_SIZES = Sizes(
    correctness_context=256, correctness_rows=1, throughput_model=(), throughput_context=256, throughput_micro_batch=1,
    throughput_precision="fp32", warmup_steps=1, timed_steps=1, matmul_n=512, cli_context=256, cli_micro_batch=1,
    cli_steps=4, cli_save_at=2, cli_poll_s=0.05)


class Report:
    """One part's findings, rewritten to disk (atomically) whenever something is added."""

    def __init__(self, path: Path, part: str) -> None:
        self.path = path
        self.data: dict[str, Any] = {"part": part, "checks": [], "skipped": [], "results": {}, "error": None}
        self.write()

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.data["checks"].append({"name": name, "ok": bool(ok), "detail": detail})
        self.write()
        return bool(ok)

    def skip(self, what: str, reason: str) -> None:
        self.data["skipped"].append({"what": what, "reason": reason})
        self.write()

    def put(self, key: str, value: Any) -> None:
        self.data["results"][key] = value
        self.write()

    def add(self, key: str, value: Any) -> None:
        self.data["results"].setdefault(key, []).append(value)
        self.write()

    def write(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


@dataclass(frozen=True)
class Context:
    out: Path  # this part's own folder under --out
    dry_run: bool
    sizes: Sizes
    report: Report


# ---------------------------------------------------------------------------------------------
# Attention kernels: which exist, and which can run here
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Kernel:
    name: str
    selectable: bool  # a value of model.attn_implementation in this tree
    forward: str | None  # None: runs here; else why not
    backward: str | None
    fp32: bool  # runs in fp32 as well as bf16


def attention_kernels(on_cuda: bool) -> list[Kernel]:
    """Every kernel the schema offers, and torch's own ones the design's `auto` order names, with
    why each cannot run here: the trainer's own answer (`hardware.attention_refusal`) at bf16, the
    dtype every kernel runs in. Flex attention runs forward on the CPU; only its backward does not."""
    from vicuna_exp.choices import AttnImpl
    from vicuna_exp.hardware import attention_refusal, probe_attention

    facts = probe_attention(on_cuda=on_cuda, precision="bf16_mixed")
    names = [m.value for m in AttnImpl if m != AttnImpl.auto]
    names += [n for n in TORCH_NATIVE_ATTENTION if n not in names]
    out = []
    for name in names:
        selectable = name in set(AttnImpl)
        why = attention_refusal(AttnImpl(name), facts) if selectable else "not a model.attn_implementation here"
        backward = why
        if name == AttnImpl.flex_attention and facts.torch_flex and not on_cuda:
            why = None  # the forward runs on the CPU
        out.append(Kernel(name, selectable, why, backward,
                          fp32=name not in (AttnImpl.flash_attention_2, AttnImpl.varlen)))
    return out


# ---------------------------------------------------------------------------------------------
# Part 1: environment
# ---------------------------------------------------------------------------------------------
def part_env(ctx: Context) -> None:
    """Versions, the device, bf16, the attention kernels, and that every module a run needs imports."""
    import platform
    from importlib import metadata

    import torch

    r = ctx.report
    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for dist in ("transformers", "deepspeed", "hydra-core", "omegaconf", "datasets", "tokenizers", "flash-attn"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    r.put("versions", versions)
    on_cuda = torch.cuda.is_available()
    device: dict[str, Any] = {"cuda_available": on_cuda}
    if on_cuda:
        props = torch.cuda.get_device_properties(0)
        device.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 2),
                      compute_capability=f"{props.major}.{props.minor}", count=torch.cuda.device_count(),
                      bf16=torch.cuda.is_bf16_supported(), driver=_driver_version())
    r.put("device", device)
    if not ctx.dry_run:
        r.check("a CUDA device is visible to torch", on_cuda, device.get("name", "torch.cuda.is_available() is False"))
        if on_cuda:
            r.check("the GPU computes in bf16", device["bf16"], f"compute capability {device['compute_capability']}")
    r.put("attention", {k.name: {"selectable": k.selectable, "forward": k.forward or "runs",
                                 "backward": k.backward or "runs", "fp32": k.fp32} for k in attention_kernels(on_cuda)})
    from omegaconf import OmegaConf

    from vicuna_exp import hardware

    resolved = hardware.resolve(OmegaConf.create({"name": "auto", "reference": None, "strict": False}),
                                on_gpu=on_cuda)
    r.put("hardware_profile", {"source": resolved.source, "name": resolved.facts.get("name"),
                               "bf16_tflops": resolved.facts.get("bf16_tflops"),
                               "fp32_tflops": resolved.facts.get("fp32_tflops"), "warnings": list(resolved.warnings)})
    failed = []
    for module in ("vicuna_exp.train", "vicuna_exp.job", "vicuna_exp.launch", "vicuna_exp.worker",
                   "vicuna_exp.backends.fsdp", "vicuna_exp.backends.deepspeed", "vicuna_exp.plan"):
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - each failure is reported, the next module still tried
            failed.append(f"{module}: {type(e).__name__}: {e}")
    r.check("every module a run needs imports", not failed, "; ".join(failed) or "train, job, launch, worker, "
            "backends.fsdp, backends.deepspeed, plan")


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out.strip() else None


# ---------------------------------------------------------------------------------------------
# Parts 2 and 3: through the project's Recipe, in this process
# ---------------------------------------------------------------------------------------------
def _recipe(ctx: Context, name: str, overrides: list[str]) -> Any:
    """A set-up `Recipe` (single backend) for these overrides, with its run dir under this part's."""
    from vicuna_exp import distributed as D
    from vicuna_exp.hydra_app import compose
    from vicuna_exp.train import Recipe

    run_dir = ctx.out / name
    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = ["logger=none", *overrides]
    recipe = Recipe(compose(overrides), run_dir, overrides, D.from_env())
    try:
        recipe.setup()
    except BaseException:
        recipe.finish("failed", "set-up failed", 1)
        raise
    return recipe


def _release(recipe: Any) -> None:
    """Close a recipe and give its device memory back, so the next one's peak is its own."""
    import gc

    import torch

    recipe.finish("completed", None, 0)
    recipe.model = recipe.backend = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def part_correctness(ctx: Context) -> None:
    """Packed rows against the same examples one per padded row: loss and gradients, per kernel and
    dtype, through the recipe's collate and loss."""
    import torch

    r, on_cuda = ctx.report, torch.cuda.is_available()
    r.put("torch_compile", "off (TORCHDYNAMO_DISABLE=1): flex attention runs unfused"
          if os.environ.get("TORCHDYNAMO_DISABLE") == "1"
          else "on: flex attention and its block mask are compiled")
    kernels = [k for k in attention_kernels(on_cuda) if _runs_here(r, k)]
    for k in kernels:
        if not k.fp32:
            r.skip(f"{k.name} fp32", "the kernel runs in bf16/fp16 only")
    for precision, dtype in (("bf16_mixed", "bf16"), ("fp32", "fp32")):
        wanted = [k for k in kernels if dtype == "bf16" or k.fp32]
        if not wanted:
            continue
        recipe = _recipe(ctx, f"correctness_{dtype}", [f"context.length={ctx.sizes.correctness_context}",
                                                      f"trainer.precision={precision}", "model.attn_implementation=sdpa"])
        try:
            rows = [row for row in recipe.epoch_rows(0) if len(row) > 1][:ctx.sizes.correctness_rows]
            examples = [[i] for row in rows for i in row]
            unpacked = recipe.collate(examples)  # one example a row: padded, not packed
            for k in wanted:
                try:
                    _compare_packed(r, recipe, k, dtype, rows, unpacked)
                except Exception as e:  # noqa: BLE001 - one kernel's failure is its result; the next runs
                    r.check(f"{k.name} {dtype}: packed equals unpacked", False, f"{type(e).__name__}: {str(e)[:300]}")
        finally:
            _release(recipe)


def _compare_packed(r: Report, recipe: Any, k: Kernel, dtype: str, rows: list[list[int]],
                    unpacked: dict[str, Any]) -> None:
    """One kernel: the packed rows' loss and gradients against the unpacked batch's, in one check."""
    _use_kernel(recipe, k.name)
    packed = recipe.collate(rows)
    grads = k.backward is None
    if not grads:
        r.skip(f"{k.name} {dtype} gradients", k.backward or "")
    lp, gp = _loss_and_grads(recipe, packed, grads)
    # varlen flattens every batch (it takes no padding mask): its unpacked reference is sdpa's padded rows
    _use_kernel(recipe, "sdpa" if k.name == "varlen" else k.name)
    lu, gu = _loss_and_grads(recipe, unpacked, grads)
    same_tokens = packed["num_supervised"] == int((unpacked["labels"][:, 1:] != -100).sum())
    loss_tol, grad_tol = TOLERANCE[dtype]
    loss_err = abs(lp - lu) / max(abs(lu), 1e-12)
    entry = {"kernel": k.name, "dtype": dtype, "examples": sum(len(row) for row in rows), "rows_packed": len(rows),
             "supervised_tokens": packed["num_supervised"], "loss_packed": lp, "loss_unpacked": lu,
             "loss_rel_err": loss_err}
    ok = same_tokens and math.isfinite(lp) and loss_err <= loss_tol
    if grads:
        entry["grad_rel_err"] = float((gp - gu).norm() / gu.norm().clamp(min=1e-30))
        ok = ok and entry["grad_rel_err"] <= grad_tol
    r.add("cases", entry)
    r.check(f"{k.name} {dtype}: packed equals unpacked", ok,
            f"loss {loss_err:.2e} (tol {loss_tol:g})"
            + (f", grad {entry['grad_rel_err']:.2e} (tol {grad_tol:g})" if grads else ", forward only")
            + ("" if same_tokens else "; the two batches supervise different token counts"))


def _use_kernel(recipe: Any, name: str) -> None:
    """Switch the built model's attention; the recipe's collate lays batches out for it."""
    from vicuna_exp.attention import register_varlen

    register_varlen()
    recipe.model.set_attn_implementation(name)
    recipe.spec.hf_config._attn_implementation = name


def _runs_here(r: Report, k: Kernel) -> bool:
    """True when the kernel's forward runs here; else its skip is recorded."""
    if k.forward is None:
        return True
    r.skip(k.name, k.forward)
    return False


def _loss_and_grads(recipe: Any, batch: dict[str, Any], grads: bool) -> tuple[float, Any]:
    """Mean loss per supervised token, and the flat gradient of it (None without `grads`)."""
    import torch

    n = (batch["labels"][:, 1:] != -100).sum()
    recipe.model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grads):
        loss = recipe.token_loss_sum(batch) / n
    if not grads:
        return loss.item(), None
    loss.backward()
    flat = torch.cat([p.grad.float().flatten() for p in recipe.model.parameters() if p.grad is not None])
    return loss.detach().item(), flat


def matmul_peak_tflops(n: int, dtype_name: str = "bfloat16", repeats: int = 10) -> float:
    """Measured dense matmul rate of this device: an n x n x n product, 3 warm-ups, `repeats` timed."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, dtype_name)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(repeats):
            a @ b
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        seconds = time.perf_counter() - t0
    return 2.0 * n**3 * repeats / seconds / 1e12


def part_throughput(ctx: Context) -> None:
    """The ~1B model's training step per kernel, checkpointing off and on: the recipe's own
    `train_step` (collate, forward, backward, optimizer), timed after warm-up, and its peak memory
    against the planner's prediction for the same config."""
    import torch

    r, s, on_cuda = ctx.report, ctx.sizes, torch.cuda.is_available()
    peak = matmul_peak_tflops(s.matmul_n)
    r.put("matmul_bf16_tflops", round(peak, 3))
    r.put("matmul", f"{s.matmul_n}^3 bf16, mean of 10 after 3 warm-ups")
    steps = s.warmup_steps + s.timed_steps
    for k in attention_kernels(on_cuda):
        if not _runs_here(r, k):
            continue
        if k.backward is not None:
            r.skip(f"{k.name} throughput", k.backward)
            continue
        if not k.selectable:
            r.skip(f"{k.name} throughput", "model.attn_implementation has no such choice in this tree (issue 21)")
            continue
        for ckpt in (False, True):
            label = f"{k.name}, checkpointing {'on' if ckpt else 'off'}"
            overrides = ["model=tiny", *s.throughput_model, f"model.gradient_checkpointing={str(ckpt).lower()}",
                         f"model.attn_implementation={k.name}", f"context.length={s.throughput_context}",
                         f"trainer.precision={s.throughput_precision}", f"trainer.micro_batch_size={s.throughput_micro_batch}",
                         f"trainer.global_batch_size={s.throughput_micro_batch}", f"trainer.max_steps={steps}",
                         f"trainer.epochs={steps}"]
            try:
                entry = _time_steps(ctx, f"throughput_{k.name}_ckpt{int(ckpt)}", overrides, peak)
            except Exception as e:  # noqa: BLE001 - an OOM or kernel error is this config's result
                r.add("runs", {"config": label, "error": f"{type(e).__name__}: {e}"})
                r.check(f"{label}: trains", False, f"{type(e).__name__}: {str(e)[:300]}")
                continue
            entry = {"config": label, **entry}
            r.add("runs", entry)
            r.check(f"{label}: trains", math.isfinite(entry["loss_last"]),
                    f"{entry['tokens_per_s']:,.0f} tokens/s, MFU {_pct(entry['mfu_profile'])} of the profile peak, "
                    f"peak reserved {entry['peak_reserved_gib']:.2f} GiB vs plan {entry['predicted_allocator_gib']:.2f}")


def _time_steps(ctx: Context, name: str, overrides: list[str], matmul_peak: float) -> dict[str, Any]:
    """Warm-up steps, then timed ones, of one config; its figures and the plan's for it."""
    from vicuna_exp.plan.estimate import plan_on

    s = ctx.sizes
    recipe = _recipe(ctx, name, overrides)
    try:
        plan = plan_on(recipe.cfg, recipe.hardware)
        recipe.peak_memory.reset()
        timed: list[dict[str, Any]] = []
        for step in range(1, s.warmup_steps + s.timed_steps + 1):
            metrics = recipe.train_step(step)
            if step > s.warmup_steps:
                timed.append({**metrics, "model_flops": recipe.step_flops})
        seconds = sum(m["step_s"] for m in timed)
        flops = sum(m["model_flops"] for m in timed)
        achieved = flops / seconds / 1e12
        mem, gib = plan.memory, 2**30
        context_gib = float(recipe.cfg.plan.cuda_context_gb) if recipe.device.type == "cuda" else 0.0
        measured = recipe.peak_memory.peak_gb()
        predicted_allocator = mem.total / gib - context_gib
        return {
            "params": recipe.facts.total_params, "device": str(recipe.device), "precision": recipe.precision,
            "attn_implementation": recipe.spec.hf_config._attn_implementation,
            "timed_steps": len(timed), "tokens_per_s": sum(m["tokens_per_s"] * m["step_s"] for m in timed) / seconds,
            "supervised_tokens_per_s": sum(m["supervised_tokens_per_s"] * m["step_s"] for m in timed) / seconds,
            "step_s_median": statistics.median(m["step_s"] for m in timed),
            "packing_efficiency": statistics.mean(m["packing_efficiency"] for m in timed),
            "tflops_per_device": achieved, "profile_peak_tflops": recipe.peak_tflops,
            "mfu_profile": achieved / recipe.peak_tflops if recipe.peak_tflops else None,
            "mfu_measured_peak": achieved / matmul_peak if matmul_peak > 0 else None,
            "peak_reserved_gib": measured, "memory_measure": "torch.cuda.max_memory_reserved" if
            recipe.device.type == "cuda" else "peak RSS (VmHWM) of the process",
            "predicted_gib": mem.total / gib, "predicted_allocator_gib": predicted_allocator,
            "measured_over_predicted": measured / predicted_allocator if predicted_allocator > 0 else None,
            "predicted_breakdown_gib": {k: round(v / gib, 3) for k, v in (
                ("params", mem.params), ("grads", mem.grads), ("optimizer", mem.optim),
                ("activations", mem.activations), ("logits", mem.logits), ("gathered", mem.gathered),
                ("comm_buckets", mem.comm_buckets), ("autocast_copies", mem.autocast_copies),
                ("overhead", mem.overhead))},
            "loss_first": timed[0]["loss"], "loss_last": timed[-1]["loss"]}
    finally:
        _release(recipe)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


# ---------------------------------------------------------------------------------------------
# Parts 4-6: the real CLI, in child processes
# ---------------------------------------------------------------------------------------------
def cli_overrides(ctx: Context) -> list[str]:
    """The small run the CLI parts share: the same model, data and batch (accumulation 2)."""
    s = ctx.sizes
    return ["logger=none", "model=tiny", f"context.length={s.cli_context}", f"trainer.micro_batch_size={s.cli_micro_batch}",
            f"trainer.global_batch_size={2 * s.cli_micro_batch}", f"trainer.max_steps={s.cli_steps}",
            f"trainer.epochs={s.cli_steps}", f"trainer.save_every_steps={s.cli_save_at}", "trainer.log_every_steps=1",
            "trainer.eval_every_steps=null", "trainer.eval_max_rows=8"]


def train_command(run_dir: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "vicuna_exp", "train", *overrides, f"hydra.run.dir={run_dir}"]


def run_cli(cmd: list[str], log: Path, timeout: float | None = None) -> int:
    """Run a command to the end (its own process group, killed with it on a timeout)."""
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise


def train_losses(run_dir: Path) -> dict[int, float]:
    """Step -> loss from a run dir's metrics.jsonl (train lines only)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the SIGKILL
            continue
        if "loss" in rec and "step" in rec:
            out[int(rec["step"])] = float(rec["loss"])
    return out


def read_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def tail(path: Path, n: int = 1500) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else ""


def part_e2e(ctx: Context) -> None:
    """Train through the CLI, SIGKILL it after a checkpoint, rerun the same command: it resumes,
    and the steps it repeats give the losses the killed run logged."""
    r, s = ctx.report, ctx.sizes
    run_dir, log = ctx.out / "run", ctx.out / "train.log"
    cmd = train_command(run_dir, cli_overrides(ctx))
    r.put("command", " ".join(cmd[1:]))
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        killed_after: int | None = None
        while proc.poll() is None:
            logged = train_losses(run_dir)
            if logged and max(logged) > s.cli_save_at:  # the checkpoint of step cli_save_at is complete
                os.killpg(proc.pid, signal.SIGKILL)
                killed_after = max(logged)
                break
            time.sleep(s.cli_poll_s)
        rc = proc.wait()
    before = train_losses(run_dir)
    r.put("killed_after_step", killed_after)
    if not r.check("the run is SIGKILLed after its checkpoint", killed_after is not None and rc == -signal.SIGKILL,
                   f"killed after step {killed_after}" if killed_after else
                   f"it ended first with exit {rc}: {tail(log, 400)}"):
        return
    t0 = time.monotonic()
    rc = run_cli(cmd, log)
    r.put("resume_s", round(time.monotonic() - t0, 2))
    summary, after = read_summary(run_dir), train_losses(run_dir)
    r.put("summary", {k: summary.get(k) for k in ("status", "exit_code", "steps", "resumed_from_step", "final_loss",
                                                 "wall_s", "tflops_per_device", "peak_mem_gb", "error")})
    completed = rc == 0 and summary.get("status") == "completed"
    r.check("the rerun exits 0 and completes", completed, f"exit {rc}, status {summary.get('status')}"
            + ("" if completed else f", error {summary.get('error') or tail(log, 400)}"))
    r.check(f"it resumes from step {s.cli_save_at}", summary.get("resumed_from_step") == s.cli_save_at,
            f"resumed_from_step {summary.get('resumed_from_step')}")
    r.check(f"it trains all {s.cli_steps} steps", sorted(after) == list(range(1, s.cli_steps + 1)),
            f"steps logged: {sorted(after)}")
    repeated = [step for step in range(s.cli_save_at + 1, killed_after + 1) if step in before and step in after]
    precision = str((summary.get("derived") or {}).get("precision", "fp32"))
    tol = RESUME_TOLERANCE.get(precision, 1e-2)
    diffs = {step: abs(after[step] - before[step]) / max(abs(before[step]), 1e-12) for step in repeated}
    r.put("resumed_losses", {str(step): {"killed_run": before[step], "resumed": after[step]} for step in repeated})
    worst = max(diffs.values(), default=math.inf)
    r.check("the repeated steps' losses equal the killed run's", bool(repeated) and worst <= tol,
            f"steps {repeated}, largest relative difference {worst:.2e} (tol {tol:g}, {precision})")


def _sharded_run(ctx: Context, backend: str, extra: list[str]) -> dict[str, Any]:
    """One rank of a sharding backend through the CLI (torchrun), checked as every run is."""
    r, s = ctx.report, ctx.sizes
    run_dir, log = ctx.out / "run", ctx.out / "train.log"
    cmd = train_command(run_dir, [*cli_overrides(ctx), f"backend={backend}", "launcher.nproc_per_node=1", *extra])
    r.put("command", " ".join(cmd[1:]))
    t0 = time.monotonic()
    rc = run_cli(cmd, log)
    r.put("train_s", round(time.monotonic() - t0, 2))
    summary, losses = read_summary(run_dir), train_losses(run_dir)
    derived = summary.get("derived") or {}
    r.put("summary", {k: summary.get(k) for k in ("status", "exit_code", "steps", "final_loss", "wall_s",
                                                 "tflops_per_device", "mfu", "peak_mem_gb", "error")})
    r.put("losses", losses)
    completed = rc == 0 and summary.get("status") == "completed"
    r.check(f"{backend} exits 0 and completes", completed, f"exit {rc}, status {summary.get('status')}"
            + ("" if completed else f", error {summary.get('error') or tail(log, 400)}"))
    r.check(f"one rank, accumulation 2, {s.cli_steps} finite losses",
            derived.get("world_size") == 1 and derived.get("grad_accumulation") == 2
            and sorted(losses) == list(range(1, s.cli_steps + 1)) and all(map(math.isfinite, losses.values())),
            f"world {derived.get('world_size')}, accumulation {derived.get('grad_accumulation')}, "
            f"steps {sorted(losses)}")
    single = train_losses(ctx.out.parent / "e2e" / "run")
    if single:  # the same model, data and batch under `single` (part 4): for the reader, not a check
        common = [k for k in losses if k in single]
        r.put("largest_relative_loss_difference_vs_single",
              max((abs(losses[k] - single[k]) / max(abs(single[k]), 1e-12) for k in common), default=None))
    return summary


def part_fsdp(ctx: Context) -> None:
    """FSDP2 with one rank, over nccl on a GPU (gloo on the CPU), accumulating 2 micro-batches."""
    dist = "gloo" if ctx.dry_run else "nccl"
    if ctx.dry_run:
        ctx.report.skip("nccl", "nccl needs CUDA: the dry run's FSDP rank talks over gloo")
    _sharded_run(ctx, "fsdp", [f"launcher.dist_backend={dist}"])


def part_deepspeed(ctx: Context) -> None:
    """DeepSpeed ZeRO-3 with one rank: first the JIT ops the run loads (built, or loaded when built
    already; at most 150 s), timed on their own, then the run."""
    from vicuna_exp.backends.build_ops import (
        extensions_dir,
        needed_ops,
        use_extensions_dir,
    )

    r = ctx.report
    use_extensions_dir()
    ops = needed_ops(on_gpu=not ctx.dry_run, offload_optimizer=False)
    where = extensions_dir()
    built_before = _built_ops(where)
    r.put("ops", {"needed": ops, "extensions_dir": str(where), "built_before": sorted(built_before)})
    if ops:
        log, locks = ctx.out / "build_ops.log", _locks(where)
        t0 = time.monotonic()
        try:  # loads each op, building it first when torch's JIT finds it missing or stale
            rc = run_cli([sys.executable, "-m", "vicuna_exp.backends.build_ops", "--ops", *ops], log,
                         timeout=OP_BUILD_LIMIT_S)
        except subprocess.TimeoutExpired:
            r.put("op_build_s", round(time.monotonic() - t0, 1))
            left = sorted(str(p) for p in _locks(where) - locks)
            r.check(f"the ops build within {OP_BUILD_LIMIT_S:.0f} s", False,
                    f"{' '.join(ops)} still building (or waiting for another build) after {OP_BUILD_LIMIT_S:.0f} s; "
                    "killed" + (f". Lock files left: {', '.join(left)}; once no other build runs, delete them "
                                "(DeepSpeed waits on a lock forever) and run `python -m vicuna_exp.backends.build_ops`"
                                if left else ""))
            return
        r.put("op_build_s", round(time.monotonic() - t0, 1))
        r.put("op_build_log", tail(log, 600))
        if not r.check(f"the ops build within {OP_BUILD_LIMIT_S:.0f} s", rc == 0,
                       f"{', '.join(ops)}: {r.data['results']['op_build_s']} s, DeepSpeed's import included"
                       + (f"; {tail(log, 400)}" if rc else "")):
            return
    else:
        r.put("op_build_s", 0.0)
        r.put("op_build", "this run loads no JIT op on CUDA (torch's AdamW, nothing offloaded)")
    before_run = _built_ops(where)
    _sharded_run(ctx, "deepspeed_zero3", [])
    # an op (re)built inside the run: its time is in train_s, not op_build_s
    r.put("ops_built_during_the_run", sorted(k for k, v in _built_ops(where).items() if before_run.get(k) != v))


def _built_ops(where: Path) -> dict[str, float]:
    """Built ops in the extensions dir, with the time each was last built."""
    if not where.is_dir():
        return {}
    libs = (p / f"{p.name}.so" for p in where.iterdir() if p.is_dir())
    return {lib.parent.name: lib.stat().st_mtime for lib in libs if lib.is_file()}


def _locks(where: Path) -> set[Path]:
    """The build locks (torch's `FileBaton`) in the extensions dir."""
    return set(where.glob("*/lock")) if where.is_dir() else set()


PART_FUNCTIONS: dict[str, Callable[[Context], None]] = {
    "env": part_env, "correctness": part_correctness, "throughput": part_throughput, "e2e": part_e2e,
    "fsdp": part_fsdp, "deepspeed": part_deepspeed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one part of bench/gpu_check.py")
    parser.add_argument("part", choices=PARTS)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    out = args.out / args.part
    out.mkdir(parents=True, exist_ok=True)
    report = Report(args.result, args.part)
    ctx = Context(out=out, dry_run=args.dry_run, sizes=DRY_SIZES if args.dry_run else GPU_SIZES, report=report)
    try:
        PART_FUNCTIONS[args.part](ctx)
    except Exception as e:  # noqa: BLE001 - the part's error goes into its report; the check goes on
        report.data["error"] = f"{type(e).__name__}: {e}"
        report.data["traceback"] = traceback.format_exc()[-4000:]
        report.write()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
