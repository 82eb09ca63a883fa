"""Gradient bytes each rank holds between micro-batches, per backend, at accumulation 1 and N.

RSS cannot see this on a CPU (a small model's gradients are below two processes' RSS noise), so
each rank counts tensors: every `.grad` plus the backend's own gradient buffers (FSDP2's
unsharded accumulators and HSDP partial reductions, ZeRO's reduce buckets and gradient
partitions), each storage once (`Backend.held_grad_bytes`). It is read after every micro-batch's
backward, and the planner's gradient term for the same config is printed beside it.

    .venv/bin/python bench/bench_grad_memory.py                      # >=100M-param LLaMA, 2 gloo ranks
    .venv/bin/python bench/bench_grad_memory.py --accumulation 1,8 --steps 3 --variants fsdp,fsdp_sync_last \\
        --json out.json

Variants: fsdp (reduce-scatter every micro-batch, the default), fsdp_sync_last
(`backend.reduce_every_micro_batch=false`), fsdp_hybrid_2x1 (HSDP, two replicas of one shard:
the cross-replica all-reduce on the last micro-batch only), deepspeed_zero2, deepspeed_zero3.
The model is random-init and fp32, batches are random tokens; every variant sees the same ones.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# backend option + overrides, and the process layout (hybrid 2x1: two "nodes" of one rank each)
VARIANTS: dict[str, tuple[list[str], int]] = {
    "fsdp": (["backend=fsdp"], 2),
    "fsdp_sync_last": (["backend=fsdp", "backend.reduce_every_micro_batch=false"], 2),
    "fsdp_hybrid_2x1": (["backend=fsdp", "backend.sharding=hybrid"], 1),
    "deepspeed_zero2": (["backend=deepspeed_zero2"], 2),
    "deepspeed_zero3": (["backend=deepspeed_zero3"], 2),
}
# LLaMA-shaped, 134M parameters: 12 layers of 7.1M, embedding and lm_head of 24.6M each
BIG = ["model.vocab_size=32000", "model.hidden_size=768", "model.intermediate_size=2048",
       "model.num_hidden_layers=12", "model.num_attention_heads=12", "model.num_key_value_heads=12"]
WORLD = 2


def config_overrides(variant: str, accumulation: int, seq: int, model: list[str]) -> list[str]:
    """The composed config of one measurement: what the planner is asked about, too."""
    backend, per_node = VARIANTS[variant]
    return ["~experiment", "model=tiny", *model, *backend, "trainer.precision=fp32", "trainer.micro_batch_size=1",
            f"trainer.global_batch_size={accumulation * WORLD}", f"context.length={seq}", "hardware=cpu",
            f"launcher.nproc_per_node={per_node}", f"launcher.nnodes={WORLD // per_node}"]


def measure(variant: str, accumulation: int, steps: int, seq: int, model: list[str]) -> dict:
    """One variant in this rank's process group: the largest held-gradient bytes seen after any
    micro-batch's backward, the same after non-final micro-batches only, and each step's loss
    and gradient norm (equal across variants that compute the same gradient)."""
    import torch

    from vicuna_exp import distributed as D
    from vicuna_exp.backends import OptimizerSpec, backend_class
    from vicuna_exp.choices import Precision
    from vicuna_exp.hydra_app import compose
    from vicuna_exp.model import make_model_spec

    cfg = compose(config_overrides(variant, accumulation, seq, model))
    info = D.from_env()
    device = torch.device("cpu")
    torch.manual_seed(0)
    spec = make_model_spec(cfg.model, vocab_size=int(cfg.model.vocab_size), device=device, precision=Precision.fp32)
    optim = OptimizerSpec(lr=1e-4, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8, fused=False,
                          lr_lambda=lambda _: 1.0)
    backend = backend_class(cfg)(cfg, info, device, Precision.fp32)
    model_ = backend.setup(spec, optim)
    vocab = int(cfg.model.vocab_size)
    held, between, losses, norms, seconds = 0, 0, [], [], []
    for step in range(steps):
        started = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64)
        for i in range(accumulation):
            ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(
                (step * accumulation + i) * WORLD + info.rank))
            with backend.accumulate(is_last=i == accumulation - 1):
                logits = model_(input_ids=ids, use_cache=False).logits[:, :-1].float()
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1),
                                                         reduction="sum")
                backend.backward(loss / (accumulation * WORLD * (seq - 1)))
            loss_sum += loss.detach().double()
            now = backend.held_grad_bytes()
            held = max(held, now)
            if i < accumulation - 1:
                between = max(between, now)
        norms.append(backend.step())
        seconds.append(time.perf_counter() - started)
        losses.append(float(D.all_reduce(loss_sum)) / (accumulation * WORLD * (seq - 1)))
    peak = D.all_reduce(torch.tensor([float(held), float(between)], dtype=torch.float64), op="max")
    backend.close()
    del backend, model_
    gc.collect()
    return {"variant": variant, "accumulation": accumulation, "held_bytes": int(peak[0]),
            "held_between_bytes": int(peak[1]), "losses": losses, "grad_norms": norms,
            "step_s": sum(seconds[1:]) / max(1, len(seconds) - 1)}  # the first step allocates


def worker(args: argparse.Namespace) -> None:
    """One rank: each variant and accumulation in turn, in one process group; rank 0 writes the rows."""
    import torch

    from vicuna_exp import distributed as D

    info = D.from_env()
    D.init_process_group(info, torch.device("cpu"))
    model = BIG if not args.model else args.model.split(",")
    rows = []
    for variant in args.variants.split(","):
        for acc in args.accumulation:
            rows.append(measure(variant, acc, args.steps, args.seq, model))
            if info.rank == 0:  # as it goes: a later variant that fails leaves these
                args.json.write_text(json.dumps(rows))
    D.destroy_process_group()


def predicted(variant: str, accumulation: int, seq: int, model: list[str]) -> dict[str, float]:
    """The planner's per-rank gradient term (held between micro-batches) for the same config, and
    one decoder layer's unsharded gradient bytes (the target's allowance)."""
    from vicuna_exp.hydra_app import compose
    from vicuna_exp.plan.estimate import held_gradient_bytes, setup_from_config

    s = setup_from_config(compose(config_overrides(variant, accumulation, seq, model)))
    return {"planner_bytes": held_gradient_bytes(s), "layer_grad_bytes": 4.0 * s.model.layer_params,
            "params": float(s.model.total_params)}


def process_groups(variants: list[str]) -> list[list[str]]:
    """FSDP variants of one node layout share two processes; each DeepSpeed variant gets its own
    (an engine does not give back all it allocated)."""
    groups: dict[object, list[str]] = {}
    for v in variants:
        groups.setdefault(v if v.startswith("deepspeed") else VARIANTS[v][1], []).append(v)
    return list(groups.values())


def run_group(variants: list[str], accumulations: list[int], steps: int, seq: int, model: str,
              threads: int) -> tuple[list[dict], bool]:
    """Two gloo ranks on this machine for variants of one node layout, told by torchrun's variables
    how they are laid out (`fsdp_hybrid_2x1`: two nodes of one rank, so HSDP has two replicas)."""
    from vicuna_exp.distributed import free_port

    per_node = VARIANTS[variants[0]][1]
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, __file__, "--worker", "--variants", ",".join(variants), "--accumulation",
               ",".join(map(str, accumulations)), "--steps", str(steps), "--seq", str(seq), "--json", str(out),
               *(["--model", model] if model else [])]
        procs = []
        for rank in range(WORLD):
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", "RANK": str(rank),
                   "LOCAL_RANK": str(rank % per_node), "WORLD_SIZE": str(WORLD), "LOCAL_WORLD_SIZE": str(per_node),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        logs = [p.communicate(timeout=3600)[0] for p in procs]
        rows = json.loads(out.read_text()) if out.is_file() else []
        if any(p.returncode for p in procs):
            codes = ", ".join(f"rank {r}: exit {p.returncode}" for r, p in enumerate(procs))
            print(f"{','.join(variants)}: a rank failed ({codes}); kept {len(rows)} rows\n"
                  + "\n".join(log[-2000:] for log in logs), file=sys.stderr)
        return rows, not any(p.returncode for p in procs)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="fsdp,fsdp_sync_last,fsdp_hybrid_2x1,deepspeed_zero2,deepspeed_zero3")
    ap.add_argument("--accumulation", default="1,8", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq", type=int, default=64, help="tokens per micro-batch (one row)")
    ap.add_argument("--model", default="", help="comma-separated model.* overrides (default: the 134M LLaMA)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return
    model = BIG if not args.model else args.model.split(",")
    threads = max(1, len(os.sched_getaffinity(0)) // WORLD)
    rows, failed = [], []
    chosen = args.variants.split(",")
    for group in process_groups(chosen):
        got, ok = run_group(group, args.accumulation, args.steps, args.seq, args.model, threads)
        failed += [] if ok else group
        for row in got:
            row.update(predicted(row["variant"], row["accumulation"], args.seq, model))
            rows.append(row)
            print(f"  {row['variant']} acc {row['accumulation']}: {row['held_bytes'] / 2**20:.1f} MiB", flush=True)
    print(f"\n{rows[0]['params'] / 1e6:.0f}M params, {WORLD} ranks, fp32; one layer's unsharded grads "
          f"{rows[0]['layer_grad_bytes'] / 2**20:.1f} MiB\n")
    print(f"{'variant':<18}{'acc':>4}{'held MiB':>10}{'between':>10}{'planner':>10}{'vs acc 1':>10}{'step s':>8}")
    base = {r["variant"]: r["held_bytes"] for r in rows if r["accumulation"] == min(args.accumulation)}
    for r in rows:
        extra = (r["held_bytes"] - base[r["variant"]]) / 2**20
        print(f"{r['variant']:<18}{r['accumulation']:>4}{r['held_bytes'] / 2**20:>10.1f}"
              f"{r['held_between_bytes'] / 2**20:>10.1f}{r['planner_bytes'] / 2**20:>10.1f}{extra:>+10.1f}"
              f"{r['step_s']:>8.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)} (see above)")


if __name__ == "__main__":
    main()
