"""Plans in words: the `vicuna-exp plan` printout, the sweep table, and the guard `train` runs.

The verdict is the sentence a researcher reads before spending GPU hours, so it says what
does not fit and what to change, not just a number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from vicuna_exp.batch_split import describe
from vicuna_exp.choices import BackendName
from vicuna_exp.errors import EXIT_OK, UsageError
from vicuna_exp.hardware import Resolved, with_resolved_hardware
from vicuna_exp.plan.estimate import (
    GIB,
    REPLICATED,
    Plan,
    held_gradient_bytes,
    make_plan,
    memory,
    plan_on,
    setup_from_config,
)


def _gb(x: float) -> str:
    gib = x / GIB
    return f"{gib:.2f}" if abs(gib) < 10 else f"{gib:.1f}"


def _num(x: float) -> str:
    """1,234 / 12.3K / 4.5M / 6.7B: readable at a glance."""
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def _hours(h: float) -> str:
    if math.isnan(h):
        return "unknown"
    return f"{h * 60:.0f} min" if h < 1 else (f"{h:.1f} h" if h < 48 else f"{h / 24:.1f} days")


def _loss_tokens(s: Any) -> str:
    """What the logits line counts: the whole micro-batch, or one chunk of the chunked loss."""
    whole = s.micro_batch * s.seq_len
    if not s.loss_chunks:
        return f"{whole:,} tokens, full logits"
    return f"{s.loss_tokens:,} tokens, one of {s.loss_chunks} chunks of supervised positions"


def verdict_sentence(plan: Plan) -> str:
    mem = plan.memory
    if not mem.fits and mem.total > mem.capacity:
        short = mem.total - mem.capacity
        return (f"does not fit: needs {_gb(mem.total)} GiB per GPU, {plan.hardware_name} has "
                f"{_gb(mem.capacity)} GiB ({_gb(short)} GiB short)")
    if not mem.fits:
        return (f"does not fit: offloaded state needs {_gb(mem.cpu_per_node)} GiB of host RAM per node, "
                f"{plan.hardware_name} nodes have {_gb(mem.cpu_capacity)} GiB (hardware.cpu_memory_gb)")
    spare = mem.capacity - mem.total
    tight = " -- tight: allocator spikes may still run out" if mem.margin < plan.tight_margin else ""
    return f"fits, with {_gb(spare)} GiB ({mem.margin:.0%}) to spare per GPU{tight}"


def suggestions(plan: Plan) -> list[str]:
    """What would make a config that does not fit, fit; most effective first."""
    s, mem = plan.setup, plan.memory
    out = []
    if s.holds_unsharded_grads:
        sharded = held_gradient_bytes(replace(s, reduce_every_micro_batch=True))
        out.append(f"backend.reduce_every_micro_batch=true (gradients {_gb(mem.grads)} -> {_gb(sharded)} GiB: "
                   f"a reduce-scatter per micro-batch instead of per step)")
    if s.backend in REPLICATED:
        out.append("shard the model state: backend=fsdp or backend=deepspeed_zero3")
    if not s.model.gradient_checkpointing and mem.activations_no_ckpt > 2 * mem.activations_ckpt:
        out.append(f"model.gradient_checkpointing=true (activations {_gb(mem.activations_no_ckpt)} -> "
                   f"{_gb(mem.activations_ckpt)} GiB)")
    if s.micro_batch > 1:
        out.append(f"trainer.micro_batch_size={s.micro_batch // 2} (more accumulation, same global batch)")
    if s.backend not in REPLICATED and not (s.offload_params or s.offload_optimizer):
        out.append("more GPUs (launcher.nproc_per_node / launcher.nnodes), or CPU offload "
                   "(backend=fsdp_offload, backend=deepspeed_zero3_offload)")
    out.append("a bigger GPU (hardware=a100-80gb, hardware=h100-80gb)")
    return out


def _method_line(s: Any) -> str:
    """The fine-tuning method, what trains, and the learning rate in force with its source."""
    a, lr = s.adapters, f"lr {s.lr:g} from {s.lr_source or 'optim.lr'}"
    if a is None:
        return f"finetune full: all {_num(s.model.total_params)} params train; {lr}"
    storage = 'fp32' if s.precision == 'fp32' else 'bf16'
    base = f"4-bit NF4 (decoder linears; the rest in {storage})" if a.quantized else storage
    return (f"finetune {a.method} (r={a.r}): {_num(a.trainable_params)} trainable params "
            f"({a.trainable_params / s.model.total_params:.2%}), base frozen in {base}; "
            f"{lr}")


def render(plan: Plan) -> str:
    """The full breakdown and verdict of one plan, as `vicuna-exp plan` prints it."""
    s, m, mem = plan.setup, plan.setup.model, plan.memory
    ckpt = "on" if m.gradient_checkpointing else "off"
    nodes = f"{s.nnodes} node{'s' if s.nnodes > 1 else ''}"
    lines = [
        f"Plan: {m.name} ({_num(m.total_params)} params; {m.source}) | context {s.seq_len:,} | "
        f"{describe(s.micro_batches)}, x {s.world} GPU{'s' if s.world > 1 else ''} = {s.global_batch} rows per step",
        f"      {s.strategy}, precision {s.precision}, gradient checkpointing {ckpt}, attention "
        f"{m.attn_implementation} ({m.attn_reason}), on {s.world} x {plan.hardware_name} ({nodes})",
        f"      hardware: {plan.hardware_source}",
        f"      {_method_line(s)}",
        "",
        "Memory per GPU (GiB)",
    ]
    rows = [
        ("parameters" + (" (frozen base + adapters)" if s.adapters else ""), mem.params),
        ("gradients (unsharded until the last micro-batch)" if s.holds_unsharded_grads
         else "gradients" + (" (adapters only)" if s.adapters else ""), mem.grads),
        ("optimizer state (AdamW" + (", adapters only)" if s.adapters else ")"), mem.optim),
        (f"activations (checkpointing {ckpt}; {'off' if ckpt == 'on' else 'on'}: "
         f"{_gb(mem.activations_no_ckpt if ckpt == 'on' else mem.activations_ckpt)})", mem.activations),
        (f"logits + loss ({m.vocab_size:,} x {_loss_tokens(s)})", mem.logits),
    ]
    if mem.gathered:
        what = "gathered FSDP units (2 layers + root + layer grads)" if s.backend == BackendName.fsdp \
            else "ZeRO-3 gathered largest module (params + grads)"
        rows.append((what, mem.gathered))
    if mem.comm_buckets:
        what = {"ddp": "DDP gradient buckets", "deepspeed": "ZeRO communication buckets"}.get(s.backend, "buckets")
        rows.append((what, mem.comm_buckets))
    if mem.autocast_copies:
        rows.append(("autocast bf16 weight copies", mem.autocast_copies))
    rows.append(("CUDA context + allocator fragmentation" if mem.overhead and plan.hardware_name != "cpu"
                 else "allocator fragmentation", mem.overhead))
    width = max(len(r[0]) for r in rows) + 2
    lines += [f"  {label:<{width}}{_gb(value):>8}" for label, value in rows]
    lines.append(f"  {'total':<{width}}{_gb(mem.total):>8}  of {_gb(mem.capacity)} on {plan.hardware_name}")
    if mem.cpu_per_node:
        lines.append(f"  {'offloaded to host RAM, per node':<{width}}{_gb(mem.cpu_per_node):>8}  "
                     f"of {_gb(mem.cpu_capacity)}")
    lines += ["", f"Verdict: {verdict_sentence(plan)}."]
    if not mem.fits:
        lines += ["To make it fit, try:"] + [f"  - {tip}" for tip in suggestions(plan)]
    lines += [
        "",
        f"Compute: {plan.flops_per_token:.3g} FLOPs per token ("
        + (f"6N with N={_num(m.matmul_params)} matmul params" if s.adapters is None else
           f"4N over the frozen N={_num(m.matmul_params)} matmul params, 6 per adapter parameter")
        + f", + attention at {s.seq_len:,} tokens)",
        f"         peak {plan.peak_tflops:g} TFLOP/s per GPU ({'fp32' if s.precision == 'fp32' else 'bf16'}), "
        f"assumed MFU {plan.assumed_mfu:.0%} (plan.assumed_mfu) -> {_num(plan.tokens_per_s)} tokens/s "
        f"on {s.world} GPUs",
        f"Time:    {_num(plan.tokens_per_epoch)} tokens per epoch ({plan.tokens_source})",
        f"         {_hours(plan.hours_per_epoch)} per epoch, {_hours(plan.hours_total)} for {s.epochs:g} epochs",
        f"Cost:    {plan.hours_total * s.world:,.0f} GPU-hours: ${plan.usd_on_demand:,.0f} on demand, "
        f"${plan.usd_spot:,.0f} on spot ({plan.hardware_name} at "
        f"${plan.usd_on_demand / max(plan.hours_total * s.world, 1e-12):.2f} / "
        f"${plan.usd_spot / max(plan.hours_total * s.world, 1e-12):.2f} per GPU-hour)",
    ]
    lines += [f"Note:    {n}" for n in plan.notes]
    return "\n".join(lines)


def table(cfgs: Sequence[Any], labels: Sequence[str] | None = None) -> str:
    """One row per config: what a sweep will need and cost before any of it is launched.

    `labels` name the rows (e.g. each job's override string); default: model/context/backend.
    """
    plans = [make_plan(c) for c in cfgs]
    if labels is None:
        labels = [f"{p.setup.model.name} ctx={p.setup.seq_len} {p.setup.strategy}" for p in plans]
    head = ["job", "GPUs", "hardware", "GiB/GPU", "verdict", "tokens/s", "total time", "$ on-demand", "$ spot"]
    rows = [[label, str(p.setup.world), p.hardware_name, f"{_gb(p.memory.total)}/{_gb(p.memory.capacity)}",
             p.verdict if p.memory.fits else "DOES NOT FIT", _num(p.tokens_per_s), _hours(p.hours_total),
             f"{p.usd_on_demand:,.0f}", f"{p.usd_spot:,.0f}"] for label, p in zip(labels, plans, strict=True)]
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    fmt = "  ".join(f"{{:{'<' if i in (0, 2, 4) else '>'}{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows]
    total_od, total_spot = sum(p.usd_on_demand for p in plans), sum(p.usd_spot for p in plans)
    lines.append(f"{len(plans)} jobs: ${total_od:,.0f} on demand, ${total_spot:,.0f} on spot; "
                 f"{sum(not p.memory.fits for p in plans)} do not fit")
    return "\n".join(lines)


def check_fits(cfg: Any, resolved: Resolved | None = None) -> None:
    """Refuse (UsageError, exit 2) a config whose predicted per-GPU peak exceeds the device,
    unless `plan.enforce=false`. `train` calls it before building anything, with the config's
    hardware already resolved for the device it trains on (`resolved`); without it the hardware is
    resolved here as for `vicuna-exp plan`."""
    if resolved is None:
        cfg, resolved = with_resolved_hardware(cfg, on_gpu=None)
    s = setup_from_config(cfg)
    mem = memory(s, cfg.hardware, cfg.plan)
    if mem.fits or not cfg.plan.enforce:
        return
    plan = plan_on(cfg, resolved)
    parts = ", ".join(f"{k} {_gb(v)}" for k, v in (
        ("params", mem.params), ("grads", mem.grads), ("optimizer", mem.optim),
        ("activations", mem.activations), ("logits", mem.logits),
        ("buffers", mem.gathered + mem.comm_buckets + mem.autocast_copies), ("overhead", mem.overhead)))
    raise UsageError(f"plan: {_setup_name(s)} on {s.world} x {cfg.hardware.name} with {s.strategy} "
                     f"{verdict_sentence(plan)} [GiB per GPU: {parts}]; try: {'; '.join(suggestions(plan))}; "
                     f"or set plan.enforce=false to run anyway")


def _setup_name(s: Any) -> str:
    return f"{s.model.name} at context {s.seq_len} x micro-batch {s.micro_batch}"


def main(cfg: Any) -> int:
    """`vicuna-exp plan [overrides]`: print the breakdown and the verdict; exit 0 either way."""
    print(render(make_plan(cfg)))
    return EXIT_OK
