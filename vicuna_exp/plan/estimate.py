"""The plan of one composed config: per-device memory, throughput, time and cost, in plain numbers.

Memory model (bytes per rank, N parameters, G ranks sharing the shards):
- State, by backend and precision (AdamW: two moments in the master dtype):
  single/ddp    fp32 or bf16_mixed: params 4N, grads 4N, optim 8N (16 bytes/param); bf16: 2N+2N+4N.
  fsdp (FSDP2)  the same, divided by G (fp32 shards; bf16 copies exist only while gathered).
                Gradients as held between micro-batches: sharded when each micro-batch is
                reduce-scattered (`backend.reduce_every_micro_batch`, the default); otherwise every
                parameter's unsharded gradient in the reduce dtype (4N; 2N in bf16) until the last.
  deepspeed     bf16 module params (2N, or 2N/G under ZeRO-3); fp32 master + moments 12N/G;
                grads: ZeRO-2 keeps bf16 + fp32 partitions (6N/G), ZeRO-3 an fp32 partition (4N/G).
                This is DeepSpeed's own accounting (2N + 18N/G for ZeRO-2, 18N/G for ZeRO-3).
  Offload moves the offloaded part to host RAM, checked against the node's `cpu_memory_gb`.
- Activations per micro-batch, measured on HF's LlamaDecoderLayer with saved-tensor hooks and
  checked on Mistral's and Qwen2's (see tests/plan/test_plan_measured.py): per token per layer 32h+16i+8kv (fp32),
  20h+8i+4kv (bf16 weights), 30h+8i+4kv (fp32 weights under autocast), plus 4 bytes per head;
  eager attention adds heads x seq x 4-6 bytes; a sliding window shorter than the row (sdpa) adds
  its mask row and the grouped K/V heads repeated to all heads, (seq + 2(h - kv)) x 2-4 bytes. With checkpointing each layer keeps only its
  input (h x 2-4 bytes) and one layer is recomputed at a time.
- Buffers: gathered FSDP units (current + prefetched layer, the root's embedding/lm_head, one
  layer's unsharded grads), ZeRO-3's largest module and prefetch bucket, ZeRO-2/DDP
  communication buckets, autocast's bf16 weight copies, and the logits with their fp32 loss
  copies (vocab x tokens: one chunk's tokens under the chunked loss, the micro-batch's without).
- Runtime: a CUDA context per process and an allocator fragmentation fraction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from vicuna_exp.batch_split import loss_chunk_count, micro_batch_sizes, split_error
from vicuna_exp.choices import AttnImpl, BackendName, DeviceType, Precision, Sharding
from vicuna_exp.errors import UsageError, require_resolvable
from vicuna_exp.hardware import Resolved, resolve_precision, with_resolved_hardware
from vicuna_exp.plan.adapters import AdapterFacts, activation_terms, adapter_facts, adapter_state_bytes
from vicuna_exp.plan.facts import ModelFacts, model_facts
from vicuna_exp.plan.flops import flops_per_token, peak_tflops
from vicuna_exp.text_budget import tokens_for_bytes

GIB = 2**30
REPLICATED = (BackendName.single, BackendName.ddp)  # every rank holds the whole state


@dataclass(frozen=True)
class Setup:
    """What the planner needs from a composed config, validated and resolved."""

    model: ModelFacts
    seq_len: int
    micro_batch: int  # the largest micro-batch a rank runs: what peak memory depends on
    global_batch: int
    epochs: float
    precision: Precision  # resolved: fp32 | bf16_mixed | bf16
    backend: BackendName
    zero_stage: int
    reshard_after_forward: bool
    reduce_every_micro_batch: bool  # FSDP: gradients reduce-scattered into the shards each micro-batch
    shard_group: int  # ranks one copy of the state is split over
    offload_params: bool
    offload_optimizer: bool
    bucket_bytes: float
    nproc_per_node: int
    nnodes: int
    loss_chunks: int = 0  # head calls per micro-batch of the chunked loss (`loss_chunk_count`); 0: full logits
    adapters: AdapterFacts | None = None  # finetune=lora: what trains; None: every parameter
    lr: float | None = None  # the learning rate in force (`optim.lr` after `with_lr_in_force`)
    lr_source: str | None = None

    @property
    def trainable_params(self) -> int:
        return self.adapters.trainable_params if self.adapters else self.model.total_params

    @property
    def world(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def rows_per_rank(self) -> int:
        return self.global_batch // self.world

    @property
    def micro_batches(self) -> list[int]:
        """One rank's rows of a step cut under the micro-batch cap, the last one smaller if uneven."""
        return micro_batch_sizes(self.rows_per_rank, self.micro_batch)

    @property
    def loss_tokens(self) -> int:
        """The most positions whose logits exist at once: a full micro-batch's, shared evenly over the
        chunks of the chunked loss (the recipe's cut), or all of them with the full-logits loss."""
        positions = self.micro_batch * self.seq_len
        return math.ceil(positions / self.loss_chunks) if self.loss_chunks else positions

    @property
    def grad_accum(self) -> int:
        return len(self.micro_batches)

    @property
    def holds_unsharded_grads(self) -> bool:
        """FSDP reducing once per step with several micro-batches: every parameter's unsharded
        gradient stays on each rank until the last micro-batch."""
        return self.backend == BackendName.fsdp and self.grad_accum > 1 and not self.reduce_every_micro_batch

    @property
    def strategy(self) -> str:
        if self.backend == BackendName.deepspeed:
            where = [w for w, on in (("optimizer", self.offload_optimizer), ("params", self.offload_params)) if on]
            return f"ZeRO-{self.zero_stage}" + (f" (offload {'+'.join(where)})" if where else "")
        if self.backend == BackendName.fsdp:
            return "FSDP2" + (" (CPU offload)" if self.offload_params else "")
        return str(self.backend)


def planned_tokens_for_bytes(cfg: Any, world: int) -> int:
    """Tokens per step under `trainer.bytes_per_step` at the assumed `plan.bytes_per_token` (training
    measures the ratio on its prepared data instead)."""
    ratio = float(cfg.plan.bytes_per_token)
    if not ratio > 0:
        raise UsageError(f"plan.bytes_per_token: must be > 0, got {ratio}")
    return tokens_for_bytes(int(cfg.trainer.bytes_per_step), ratio, int(cfg.context.length), world)


def _validate_hardware(hw: Any) -> None:
    for key in ("gpu_memory_gb", "bf16_tflops", "fp32_tflops", "cpu_memory_gb"):
        if key.endswith("_tflops") and hw[key] is None:  # a GPU whose peak is not known: no time estimate
            continue
        if not float(hw[key]) > 0:
            raise UsageError(f"hardware.{key}: must be > 0, got {hw[key]} (hardware={hw.name})")
    if int(hw.gpus_per_node) < 1:
        raise UsageError(f"hardware.gpus_per_node: must be >= 1, got {hw.gpus_per_node} (hardware={hw.name})")
    for key in ("on_demand_usd_per_gpu_hour", "spot_usd_per_gpu_hour"):
        if float(hw[key]) < 0:
            raise UsageError(f"hardware.{key}: must be >= 0, got {hw[key]} (hardware={hw.name})")


def setup_from_config(cfg: Any) -> Setup:
    """Read and check everything the plan depends on; UsageError names the key at fault."""
    require_resolvable(cfg)
    hw = cfg.hardware
    _validate_hardware(hw)
    nproc, nnodes = int(cfg.launcher.nproc_per_node), int(cfg.launcher.nnodes)
    if nproc < 1 or nnodes < 1:
        raise UsageError(f"launcher.nproc_per_node and launcher.nnodes must be >= 1, got {nproc} and {nnodes}")
    if hw.device == DeviceType.cuda and nproc > int(hw.gpus_per_node):
        raise UsageError(f"launcher.nproc_per_node={nproc}: a {hw.name} node has {hw.gpus_per_node} GPUs "
                         f"(hardware.gpus_per_node); use more nodes (launcher.nnodes) instead")
    world = nproc * nnodes
    t = cfg.trainer
    cap = int(t.micro_batch_size)
    seq_len = int(cfg.context.length)
    if cap < 1 or seq_len < 1:
        raise UsageError(f"trainer.micro_batch_size and context.length must be >= 1, got {cap} and {seq_len}")
    tokens_per_step = t.tokens_per_step if "tokens_per_step" in t else None
    source = "trainer.tokens_per_step" if tokens_per_step else "trainer.global_batch_size"
    if not tokens_per_step and t.get("bytes_per_step") is not None:
        tokens_per_step, source = planned_tokens_for_bytes(cfg, world), "trainer.bytes_per_step"
    global_batch = int(tokens_per_step) // seq_len if tokens_per_step else int(t.global_batch_size)
    if global_batch < 1:
        raise UsageError(f"trainer.global_batch_size: must be >= 1, got {global_batch}")
    split = split_error(global_batch, nproc, nnodes, source=source)
    if split:
        raise UsageError(split)
    micro = min(cap, global_batch // world)  # the cap binds only when a rank has more rows than it
    precision = resolve_precision(Precision(t.precision), on_cuda=hw.device == DeviceType.cuda)
    b = cfg.backend
    name = BackendName(b.name)
    zero_stage = int(b.zero_stage) if name == BackendName.deepspeed else 0
    if name == BackendName.deepspeed and zero_stage not in (2, 3):
        raise UsageError(f"backend.zero_stage: must be 2 or 3, got {zero_stage}")
    if name == BackendName.fsdp:
        offload_params = offload_optimizer = bool(b.cpu_offload)
    elif name == BackendName.deepspeed:
        offload_optimizer, offload_params = bool(b.offload_optimizer), bool(b.offload_params) and zero_stage == 3
    else:
        offload_params = offload_optimizer = False
    hybrid = name == BackendName.fsdp and b.sharding == Sharding.hybrid
    shard_group = 1 if name in REPLICATED else (nproc if hybrid else world)
    facts = model_facts(cfg.model, on_cuda=hw.device == DeviceType.cuda, precision=precision)
    return Setup(
        model=facts,
        adapters=adapter_facts(facts, cfg.finetune if "finetune" in cfg else None),
        lr=float(cfg.optim.lr), lr_source=cfg.optim.get("lr_source"),
        seq_len=seq_len,
        micro_batch=micro,
        global_batch=global_batch,
        epochs=float(t.epochs),
        precision=precision,
        backend=name,
        zero_stage=zero_stage,
        reshard_after_forward=bool(b.reshard_after_forward) if name == BackendName.fsdp else True,
        reduce_every_micro_batch=bool(b.reduce_every_micro_batch) if name == BackendName.fsdp else True,
        shard_group=shard_group,
        offload_params=offload_params,
        offload_optimizer=offload_optimizer,
        bucket_bytes=float(b.bucket_size_mb) * 1e6 if "bucket_size_mb" in b else 200e6,
        nproc_per_node=nproc,
        nnodes=nnodes,
        loss_chunks=loss_chunk_count(cap, seq_len, int(t.loss_chunk_tokens)) if t.get("loss_chunk_tokens") else 0,
    )


@dataclass
class Memory:
    """Bytes per rank on its device (and per node in host RAM for offloaded state)."""

    params: float
    grads: float
    optim: float
    activations: float  # as configured (with or without checkpointing)
    activations_no_ckpt: float
    activations_ckpt: float
    gathered: float  # FSDP unsharded units / ZeRO-3 working set
    comm_buckets: float
    logits: float
    autocast_copies: float
    overhead: float  # CUDA context + allocator fragmentation
    capacity: float
    cpu_per_node: float  # offloaded state of all ranks of a node
    cpu_capacity: float

    @property
    def model_states(self) -> float:
        return self.params + self.grads + self.optim

    @property
    def total(self) -> float:
        return (self.model_states + self.activations + self.gathered + self.comm_buckets + self.logits
                + self.autocast_copies + self.overhead)

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity and self.cpu_per_node <= self.cpu_capacity

    @property
    def margin(self) -> float:
        """Free fraction of the device after the predicted peak (negative: short by that fraction)."""
        return 1.0 - self.total / self.capacity


def _state_bytes(s: Setup) -> tuple[dict[str, float], dict[str, float]]:
    """(on device, in host RAM) bytes per rank of params, grads and optimizer state."""
    n, g = float(s.model.total_params), float(s.shard_group)
    if s.adapters is not None:  # a frozen base: no gradient, no optimizer state (see plan/adapters.py)
        dev = adapter_state_bytes(s.model, s.adapters, s.precision, s.shard_group, s.zero_stage)
        host = {"params": 0.0, "grads": 0.0, "optim": 0.0}
        if s.backend == BackendName.deepspeed and s.offload_optimizer:
            host["optim"], dev["optim"], host["grads"], dev["grads"] = dev["optim"], 0.0, dev["grads"], 0.0
        if s.backend == BackendName.deepspeed and s.offload_params:
            host["params"], dev["params"] = dev["params"], 0.0
            return dev, host
        return (host, dev) if s.offload_params else (dev, host)
    if s.backend == BackendName.deepspeed:
        c = 4.0 if s.precision == Precision.fp32 else 2.0  # DeepSpeed keeps module weights in the compute dtype
        params = c * n / g if s.zero_stage == 3 else c * n
        if s.zero_stage == 3:
            grads = 4.0 * n / g  # reduced straight into an fp32 partition
        else:
            grads = (c + (4.0 if c != 4.0 else 0.0)) * n / g  # 16-bit partition + its fp32 copy at step
        optim = 12.0 * n / g  # fp32 master copy (DeepSpeed clones even fp32 weights) + two moments
        dev = {"params": params, "grads": grads, "optim": optim}
        host = {"params": 0.0, "grads": 0.0, "optim": 0.0}
        if s.offload_optimizer:
            host["optim"], dev["optim"] = optim, 0.0
            host["grads"], dev["grads"] = 4.0 * n / g, 0.0  # fp32 grads live beside the CPU optimizer
        if s.offload_params:
            host["params"], dev["params"] = params, 0.0
        return dev, host
    p = 2.0 if s.precision == Precision.bf16 else 4.0  # stored weights; bf16_mixed keeps fp32 masters
    dev = {"params": p * n / g, "grads": p * n / g, "optim": 2 * p * n / g}
    host = {"params": 0.0, "grads": 0.0, "optim": 0.0}
    if s.offload_params:  # FSDP2 CPUOffloadPolicy: sharded params, grads and optimizer state on the host
        host, dev = dev, host
    return dev, host


def _held_state_bytes(s: Setup) -> tuple[dict[str, float], dict[str, float]]:
    """`_state_bytes` with the gradients as held between micro-batches, the memory peak's view.

    FSDP2 without a reduce-scatter before the last micro-batch (`reduce_every_micro_batch=false`)
    keeps every parameter's unsharded gradient, in the reduce dtype, on each rank's device until
    then; with it, only the shards are held (one layer's unsharded gradients in flight count in
    the gathered units)."""
    dev, host = _state_bytes(s)
    if s.holds_unsharded_grads:  # on the device even under CPU offload, where the shards then land
        dev["grads"] = (2.0 if s.precision == Precision.bf16 else 4.0) * float(s.model.total_params)
    return dev, host


def held_gradient_bytes(s: Setup) -> float:
    """Gradient storage one rank holds between micro-batches (device and host): the planner's
    gradient term, which `bench/bench_grad_memory.py` measures."""
    dev, host = _held_state_bytes(s)
    return dev["grads"] + host["grads"]


def activation_bytes(s: Setup, checkpointing: bool) -> float:
    """Saved activations of one micro-batch on one rank (fitted to HF's LLaMA, see module doc)."""
    m = s.model
    h, i, kv, heads, seq = m.hidden_size, m.intermediate_size, m.kv_dim, m.num_attention_heads, s.seq_len
    autocast = s.precision == Precision.bf16_mixed and s.backend in REPLICATED
    if s.precision == Precision.fp32:
        per_layer, act, residual = 32 * h + 16 * i + 8 * kv, 4, 4
    elif autocast:
        per_layer, act, residual = 30 * h + 8 * i + 4 * kv, 2, 4
    else:  # bf16 weights (pure bf16, FSDP param_dtype=bf16, DeepSpeed bf16)
        per_layer, act, residual = 20 * h + 8 * i + 4 * kv, 2, 2
    per_layer += 4 * heads + 8  # softmax log-sum-exp per head, RMSNorm scales
    outside = h * (8 + act) + 8 * m.head_dim + 16  # final norm, lm_head input, rotary tables, ids
    if s.adapters is not None:  # a frozen base saves less, the adapters and their dropout more
        # a 4-bit base computes in bf16 over fp32 adapters: LoRA's bf16-base terms (plan/adapters.py)
        quantized = s.adapters.quantized and s.precision == Precision.fp32
        per_layer, outside = activation_terms(m, s.adapters, Precision.bf16 if quantized else s.precision, autocast)
    if m.sliding_window is not None and m.sliding_window < seq and m.attn_implementation == AttnImpl.sdpa:
        # A window shorter than the row needs an explicit mask (a row of it per token, per layer),
        # and with a mask HF's sdpa path repeats the grouped K/V heads to all heads before the kernel.
        per_layer += act * (seq + 2 * (h - kv))
    if m.attn_implementation == AttnImpl.eager:
        per_layer += heads * seq * (4 if s.precision == Precision.fp32 else 6) + act * h
    tokens = s.micro_batch * seq
    layers = m.num_hidden_layers
    kept = layers * residual * h + per_layer if checkpointing else layers * per_layer
    return float(tokens * (kept + outside))


def logits_bytes(s: Setup) -> float:
    """Logits, their fp32 copy for the loss, log-softmax kept for backward, and their gradient, for
    the positions projected at once: one chunk of the chunked loss (whose backward recomputes one
    chunk at a time), or the whole micro-batch with `trainer.loss_chunk_tokens=0`. Measured against
    the process's peak in tests/plan/test_plan_measured.py."""
    out = 4 if s.precision == Precision.fp32 else 2
    per_token = s.model.vocab_size * (out + (4 if out != 4 else 0) + 4 + 4)
    return float(s.loss_tokens * per_token)


def memory(s: Setup, hw: Any, plan_cfg: Any) -> Memory:
    m = s.model
    dev, host = _held_state_bytes(s)
    c = 4.0 if s.precision == Precision.fp32 else 2.0  # compute dtype bytes
    gathered = comm = autocast = 0.0
    if s.backend == BackendName.fsdp:
        layer = float(m.layer_params)
        root = float(m.total_params - m.num_hidden_layers * m.layer_params)  # embedding, lm_head, final norm
        reduce_extra = 4.0 if s.precision == Precision.bf16_mixed else 0.0  # fp32 reduce-scatter copy
        # one layer's unsharded gradients: a frozen base has none, only its adapters
        grad_layer = s.adapters.adapter_params / m.num_hidden_layers if s.adapters else layer
        if s.reshard_after_forward:
            gathered = root * c + 2 * layer * c + grad_layer * (c + reduce_extra)
        else:
            gathered = float(m.total_params) * c + grad_layer * (c + reduce_extra)
        if s.shard_group == 1 and s.precision != Precision.bf16_mixed:
            gathered = 0.0  # one rank, no dtype change: the "unsharded" params are the params
    elif s.backend == BackendName.deepspeed:
        if s.zero_stage == 3:
            # DeepSpeed: the largest module's params + grads (a frozen base: its params alone)
            gathered = (1 if s.adapters else 2) * c * m.largest_module_params
            comm = min(s.bucket_bytes, c * m.total_params)  # prefetch bucket
        else:
            comm = 2 * min(s.bucket_bytes, c * m.total_params)  # reduce + all-gather buckets
    elif s.backend == BackendName.ddp:
        comm = dev["grads"]  # DDP's gradient buckets hold a copy of every gradient
    if s.precision == Precision.bf16_mixed and s.backend in REPLICATED:
        # bf16 weight copies autocast keeps for backward (of the fp32 adapters alone over a bf16 base)
        autocast = 2.0 * (s.adapters.adapter_params if s.adapters else m.matmul_params)
    act_ckpt, act_full = activation_bytes(s, True), activation_bytes(s, False)
    activations = act_ckpt if m.gradient_checkpointing else act_full
    logits = logits_bytes(s)
    tensors = sum(dev.values()) + activations + gathered + comm + logits + autocast
    context = float(plan_cfg.cuda_context_gb) * GIB if hw.device == DeviceType.cuda else 0.0
    overhead = context + float(plan_cfg.fragmentation) * tensors
    cpu_per_node = sum(host.values()) * s.nproc_per_node * (1.0 + float(plan_cfg.fragmentation))
    return Memory(
        params=dev["params"], grads=dev["grads"], optim=dev["optim"],
        activations=activations, activations_no_ckpt=act_full, activations_ckpt=act_ckpt,
        gathered=gathered, comm_buckets=comm, logits=logits, autocast_copies=autocast, overhead=overhead,
        capacity=float(hw.gpu_memory_gb) * GIB, cpu_per_node=cpu_per_node,
        cpu_capacity=float(hw.cpu_memory_gb) * GIB,
    )


def predicted_state_bytes(cfg: Any) -> dict[str, float]:
    """Per-rank bytes of parameters, gradients and optimizer state (device + host), as the
    backend holds them right after an optimizer step and before gradients are zeroed.

    For tests that compare against the tensors a rank really holds: params = the module's
    parameters (local shards), grads = their gradients (for DeepSpeed: its gradient partitions),
    optim = optimizer-held tensors (moments, and DeepSpeed's fp32 master partition).
    """
    cfg, _ = with_resolved_hardware(cfg, on_gpu=None)
    s = setup_from_config(cfg)
    dev, host = _state_bytes(s)
    return {k: dev[k] + host[k] for k in ("params", "grads", "optim")}


@dataclass
class Plan:
    """Everything `vicuna-exp plan` prints for one config."""

    setup: Setup
    hardware_name: str
    memory: Memory
    flops_per_token: float
    peak_tflops: float
    assumed_mfu: float
    tokens_per_s: float  # all devices
    tokens_per_epoch: float
    tokens_source: str
    hours_per_epoch: float
    hours_total: float
    usd_on_demand: float
    usd_spot: float
    tight_margin: float
    notes: list[str] = field(default_factory=list)
    hardware_source: str = ""  # which profile, and why (the device found, the preset's reference, ...)

    @property
    def verdict(self) -> str:
        return "fits" if self.memory.fits else "does not fit"


def adapter_notes(s: Setup) -> list[str]:
    """What the plan of an adapter method assumes, and what training will refuse."""
    notes = []
    if not s.adapters.all_linear:
        notes.append("activations are modelled with every linear layer adapted (an upper bound for fewer targets)")
    if s.adapters.quantized:
        notes.append("the decoder's linear layers are held in 4-bit NF4 (bitsandbytes), dequantised per matmul")
        if s.backend not in REPLICATED:
            notes.append(f"training refuses finetune=qlora on backend={s.backend}: it runs on single and ddp")
    notes.append("time assumes 6N FLOPs per token; a frozen base needs no weight gradients (about 4N)")
    return notes


def tokens_per_epoch(cfg: Any, dataset_tokens: int | None = None) -> tuple[float, str]:
    """(tokens, where the figure comes from): config value > prepared dataset > Vicuna estimate."""
    p = cfg.plan
    if p.tokens_per_epoch is not None:
        if int(p.tokens_per_epoch) <= 0:
            raise UsageError(f"plan.tokens_per_epoch: must be > 0, got {p.tokens_per_epoch}")
        return float(p.tokens_per_epoch), "plan.tokens_per_epoch"
    if dataset_tokens:
        return float(dataset_tokens), "the prepared dataset's stats"
    est = float(p.conversations) * float(p.tokens_per_conversation)
    return est, (f"assumed: {int(p.conversations):,} conversations x {int(p.tokens_per_conversation):,} tokens "
                 f"(plan.conversations, plan.tokens_per_conversation)")


def make_plan(cfg: Any, dataset_tokens: int | None = None, *, on_gpu: bool | None = None) -> Plan:
    """The plan of a composed config (see the module doc for the memory model), on the hardware the
    config resolves to (`vicuna_exp.hardware`): `on_gpu` None plans for whatever this machine has."""
    resolved_cfg, resolved = with_resolved_hardware(cfg, on_gpu=on_gpu)
    return plan_on(resolved_cfg, resolved, dataset_tokens)


def plan_on(cfg: Any, resolved: Resolved, dataset_tokens: int | None = None) -> Plan:
    """The plan of a config whose hardware section is already resolved."""
    s = setup_from_config(cfg)
    hw, p = cfg.hardware, cfg.plan
    if not 0 < float(p.assumed_mfu) <= 1:
        raise UsageError(f"plan.assumed_mfu: must be in (0, 1], got {p.assumed_mfu}")
    mem = memory(s, hw, p)
    fpt = flops_per_token(s.model, [s.seq_len], adapters=s.adapters)
    peak = peak_tflops(hw, s.precision)
    tps = float(p.assumed_mfu) * peak * 1e12 / fpt * s.world
    tokens, source = tokens_per_epoch(cfg, dataset_tokens)
    hours_epoch = tokens / tps / 3600 if tps > 0 else math.nan
    hours_total = hours_epoch * s.epochs
    gpu_hours = hours_total * s.world
    notes = list(resolved.warnings)
    if s.offload_params or s.offload_optimizer:
        notes.append("offload moves state over PCIe every step: expect a lower MFU than assumed")
    if s.precision == Precision.fp32 and hw.device == DeviceType.cuda:
        notes.append(f"fp32 runs at the fp32 peak ({hw.fp32_tflops:g} TFLOP/s): trainer.precision=bf16_mixed "
                     f"uses the {hw.bf16_tflops:g} TFLOP/s bf16 peak")
    if s.adapters is not None:
        notes += adapter_notes(s)
    if not cfg.trainer.get("tokens_per_step") and cfg.trainer.get("bytes_per_step") is not None:
        notes.append(f"trainer.bytes_per_step={int(cfg.trainer.bytes_per_step):,}: {s.global_batch * s.seq_len:,} "
                     f"tokens per step at the assumed plan.bytes_per_token={float(p.bytes_per_token):g}; training "
                     "measures bytes per token on its prepared data and sets its own")
    if s.model.attn_implementation == AttnImpl.eager:
        notes.append("eager attention stores seq x seq scores per head: use sdpa or flash_attention_2")
    return Plan(
        setup=s, hardware_name=str(hw.name), memory=mem, flops_per_token=fpt, peak_tflops=peak,
        assumed_mfu=float(p.assumed_mfu), tokens_per_s=tps, tokens_per_epoch=tokens, tokens_source=source,
        hours_per_epoch=hours_epoch, hours_total=hours_total,
        usd_on_demand=gpu_hours * float(hw.on_demand_usd_per_gpu_hour),
        usd_spot=gpu_hours * float(hw.spot_usd_per_gpu_hour), tight_margin=float(p.tight_margin), notes=notes,
        hardware_source=resolved.source,
    )
