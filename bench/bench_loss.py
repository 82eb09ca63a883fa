"""The loss path, full logits against the chunked loss, side by side in one run.

A tiny random-init LLaMA body (fp32, CPU, sdpa) with a 32,000- and a 128,256-token head runs one
forward + backward of a micro-batch (2 rows x 2048 tokens by default) through the recipe's own
loss functions (`vicuna_exp.loss`): the full-logits loss (`trainer.loss_chunk_tokens=0`) and the
chunked one (the default chunk). Rows are conversations whose turns alternate unsupervised (user)
and supervised (assistant) spans, `--supervised` of the tokens supervised (about half in ShareGPT).

- Step time: the median of `--repeats` runs of each setting, interleaved (every setting once, then
  again), after one untimed warm-up each, with glibc's malloc as it comes.
- Peak memory, measured after the timed runs: the peak resident set after a VmHWM reset
  (`/proc/self/clear_refs`), minus the resident set just before the step, so it is what the step
  adds: the loss path plus the tiny body's activations and the head's gradient. glibc's mmap
  threshold is pinned at 1 MiB for these runs (`mallopt`), so every freed buffer leaves the
  resident set and the high-water mark is the step's true peak (left alone, the threshold grows
  to 32 MB and smaller freed buffers stay resident, unseen). Pinned, every buffer is a fresh
  mapping, which is why the step time is measured before. The planner's "logits + loss" line for
  the same setting is printed beside it (its worst case: every position supervised).

    python bench/bench_loss.py                      # ctx 2048, micro-batch 2, vocab 32,000 and 128,256
    python bench/bench_loss.py --supervised 1.0     # the worst case: every position supervised
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

GIB = 2**30
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def pin_mmap_threshold(nbytes: int = 2**20) -> None:
    """Allocations from `nbytes` up are mmapped and unmapped when freed (a fixed threshold); the
    heap's free memory goes back to the kernel, so no later buffer hides in it."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    if libc.mallopt(M_MMAP_THRESHOLD, nbytes) != 1:
        raise SystemExit("bench_loss: glibc refused mallopt(M_MMAP_THRESHOLD); the peak would be unreliable")
    libc.malloc_trim(0)


def conversation_labels(ids, fraction: float, seed: int):
    """Labels of rows of conversations: turns of 50-400 tokens, supervised with probability
    `fraction` each (1.0: every position), the first token of each row unsupervised."""
    import torch

    g = torch.Generator().manual_seed(seed)
    labels = torch.full_like(ids, -100)
    for r in range(ids.size(0)):
        t = 1
        while t < ids.size(1):
            n = int(torch.randint(50, 401, (1,), generator=g))
            if fraction >= 1.0 or float(torch.rand(1, generator=g)) < fraction:
                labels[r, t:t + n] = ids[r, t:t + n]
            t += n
    return labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=2, help="rows per forward")
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument("--chunk", type=int, default=None, help="trainer.loss_chunk_tokens (default: the schema's)")
    parser.add_argument("--supervised", type=float, default=0.5, help="fraction of turns that carry loss")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    import psutil
    import torch

    from vicuna_exp.batch_split import loss_chunk_count
    from vicuna_exp.config import TrainerConfig
    from vicuna_exp.data.batching import supervised_positions
    from vicuna_exp.hydra_app import compose
    from vicuna_exp.loss import chunked_loss_sum, full_loss_sum, output_head
    from vicuna_exp.memory import PeakMemory
    from vicuna_exp.model import make_model_spec
    from vicuna_exp.plan.estimate import logits_bytes, setup_from_config

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    chunk = args.chunk if args.chunk is not None else TrainerConfig.loss_chunk_tokens
    rows, ctx = args.micro_batch, args.context
    n_chunks = loss_chunk_count(rows, ctx, chunk)
    torch.manual_seed(0)
    ids = torch.randint(3, min(args.vocab), (rows, ctx))
    labels = conversation_labels(ids, args.supervised, seed=1)
    positions, targets = supervised_positions(labels)
    batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(ctx).repeat(rows, 1),
             "loss_positions": positions, "loss_targets": targets, "num_supervised": len(targets)}

    def config(vocab: int, chunk_tokens: int):
        """The run's config for this setting: the model the recipe would build, the plan it would make."""
        return compose(["model=tiny", "hardware=cpu", "trainer.precision=fp32", f"context.length={ctx}",
                        f"trainer.micro_batch_size={rows}", f"trainer.global_batch_size={rows}",
                        f"trainer.loss_chunk_tokens={chunk_tokens}", f"model.vocab_size={vocab}",
                        f"model.hidden_size={args.hidden}", f"model.intermediate_size={args.hidden * 11 // 4}",
                        f"model.num_hidden_layers={args.layers}", "model.attn_implementation=sdpa"])

    models = {}
    for vocab in args.vocab:
        torch.manual_seed(0)
        spec = make_model_spec(config(vocab, chunk).model, vocab_size=vocab, device=torch.device("cpu"),
                               precision="fp32")
        models[vocab] = spec.build("cpu")

    def loss_of(vocab: int, mode: str):
        model = models[vocab]
        if mode == "full":
            return full_loss_sum(model, batch)
        return chunked_loss_sum(model, output_head(model), batch, n_chunks)

    peak = PeakMemory(torch.device("cpu"))
    if peak.reset() or peak.since_start:
        raise SystemExit("bench_loss: the kernel refuses to reset VmHWM (/proc/self/clear_refs); no peak to measure")

    def run(vocab: int, mode: str) -> tuple[float, float]:
        """(seconds, bytes the step added at its peak) of one forward + backward."""
        model = models[vocab]
        model.zero_grad(set_to_none=False)  # gradients already allocated: the step adds only the loss path
        peak.reset()
        before = psutil.Process().memory_info().rss
        t0 = time.perf_counter()
        loss_of(vocab, mode).backward()
        seconds = time.perf_counter() - t0
        return seconds, peak.peak_gb() * GIB - before

    settings = [(v, m) for v in args.vocab for m in ("full", "chunked")]
    for v, m in settings:  # warm-up: allocates the gradients, first-call costs
        run(v, m)
    times: dict[tuple[int, str], list[float]] = {s: [] for s in settings}
    for _ in range(args.repeats):
        for s in settings:
            times[s].append(run(*s)[0])
    pin_mmap_threshold()
    peaks = {s: run(*s)[1] for s in settings}

    results: dict = {"context": ctx, "micro_batch": rows, "chunk_tokens": chunk, "chunks": n_chunks,
                     "supervised_positions": len(targets), "positions": rows * (ctx - 1),
                     "body": {"hidden": args.hidden, "layers": args.layers}, "settings": {}}
    for (vocab, mode), values in times.items():
        planned = logits_bytes(setup_from_config(config(vocab, chunk if mode == "chunked" else 0)))
        results["settings"][f"{vocab}/{mode}"] = {
            "vocab": vocab, "mode": mode, "step_s": values, "median_s": statistics.median(values),
            "peak_bytes": peaks[(vocab, mode)], "planned_logits_bytes": planned}
    results["machine"] = {"cpus": os.cpu_count(), "torch_threads": args.threads,
                          "loadavg_before": load_before, "loadavg_after": os.getloadavg()}

    print(f"micro-batch {rows} x {ctx} tokens, {len(targets)} of {rows * (ctx - 1)} positions supervised; "
          f"LLaMA body {args.layers}x{args.hidden}, fp32 sdpa, {args.threads} threads; chunked: "
          f"{chunk} tokens a chunk at most, {n_chunks} chunks")
    print(f"{'vocab':>7} {'loss':8} {'median s':>9} {'vs full':>8} {'peak MiB':>9} {'vs full':>8} {'planned MiB':>11}")
    for vocab in args.vocab:
        full = results["settings"][f"{vocab}/full"]
        for mode in ("full", "chunked"):
            r = results["settings"][f"{vocab}/{mode}"]
            print(f"{vocab:7d} {mode:8} {r['median_s']:9.2f} {r['median_s'] / full['median_s']:8.2f} "
                  f"{r['peak_bytes'] / 2**20:9.0f} {r['peak_bytes'] / full['peak_bytes']:8.3f} "
                  f"{r['planned_logits_bytes'] / 2**20:11.0f}")
    print(f"machine: {os.cpu_count()} cpus, load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
