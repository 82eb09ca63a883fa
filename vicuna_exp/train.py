"""The training recipe, top to bottom: build the parts in order, run the loop, close everything.

Launch (`vicuna_exp.job` is the Hydra job, `vicuna_exp.launch` starts several processes):

    vicuna-exp train                                   # tiny model, sample data, CPU
    vicuna-exp train experiment=vicuna-7b model.path=/path/to/llama-7b-hf
    vicuna-exp train backend=fsdp launcher.nproc_per_node=8 context=2048

With one process and no sharding the job calls `run` itself; otherwise every rank calls `run` from
`vicuna_exp.worker` with the resolved config the job saved. The recipe never parses configs, never
branches on the backend, and calls the tracker alone for metrics.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from omegaconf import DictConfig

from vicuna_exp import distributed as D
from vicuna_exp import heartbeat, text_budget
from vicuna_exp.backends import Backend, OptimizerSpec, backend_class, lr_multiplier
from vicuna_exp.batch_split import loss_chunk_count
from vicuna_exp.checkpoint import CHECKPOINTS_DIR, CheckpointManager, TrainerState
from vicuna_exp.choices import choice_str
from vicuna_exp.config import config_hash, global_batch_size, grad_accumulation_steps
from vicuna_exp.data import batching
from vicuna_exp.data.batching import StepPlan, plan_steps
from vicuna_exp.data.prepare import PreparedData, prepare
from vicuna_exp.data.tokenizer import load_tokenizer, pad_id, token_ids
from vicuna_exp.diskspace import DiskFull, free_bytes, is_disk_full, writing
from vicuna_exp.errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    TrainingInterrupted,
    UsageError,
)
from vicuna_exp.export import FINAL_ADAPTER_DIR, torch_dtype, write_tokenizer_files
from vicuna_exp.finetune import uses_adapters
from vicuna_exp.hardware import Resolved, with_resolved_hardware
from vicuna_exp.loss import chunked_loss_sum, full_loss_sum, output_head
from vicuna_exp.memory import PeakMemory
from vicuna_exp.model import ModelSpec, make_model_spec, model_facts_of, resolve_precision
from vicuna_exp.plan import check_fits
from vicuna_exp.plan.adapters import AdapterFacts, adapter_facts
from vicuna_exp.plan.facts import ModelFacts
from vicuna_exp.plan.flops import achieved_tflops, batch_flops, mfu, peak_tflops
from vicuna_exp.preemption import StopFlags, StopNow
from vicuna_exp.preflight import expected_checkpoint_bytes
from vicuna_exp.provenance import provenance
from vicuna_exp.rundir import SUMMARY_FILE, RunStatus, Summary, latest_checkpoint
from vicuna_exp.tracking import Tracker

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

log = logging.getLogger(__name__)


def run(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> tuple[int, str | None]:
    """One rank's whole run: set up, train, and always write the summary and close the tracker.

    Returns (exit code, error). A usage error found before any work started is re-raised (exit 2).
    """
    recipe = Recipe(cfg, run_dir, overrides, D.from_env())
    status, error, code = RunStatus.failed, None, EXIT_FAILED
    try:
        recipe.setup()
        recipe.train()
        status, code = RunStatus.completed, EXIT_OK
    except TrainingInterrupted as e:
        status, error, code = RunStatus.interrupted, str(e), EXIT_INTERRUPTED
    except UsageError as e:
        error, code = str(e), (EXIT_FAILED if recipe.started else EXIT_USAGE)
        recipe.finish(status, error, code)
        if code == EXIT_USAGE:
            raise
        return code, error
    except Exception as e:
        if is_disk_full(e):  # one line, and resumable when a complete checkpoint exists
            full = e if isinstance(e, DiskFull) else DiskFull("run files", run_dir, None, free_bytes(run_dir))
            error, code = str(full), (EXIT_INTERRUPTED if recipe.resumable() else EXIT_FAILED)
            status = RunStatus.interrupted if code == EXIT_INTERRUPTED else RunStatus.failed
            print(f"vicuna-exp train: {error}", file=sys.stderr)
        else:
            error = f"{type(e).__name__}: {e}"
            recipe.traceback = traceback.format_exc()
            log.error("training failed: %s (traceback in %s)", error, run_dir / SUMMARY_FILE)
    recipe.finish(status, error, code)
    return code, error


class Recipe:
    """Holds the parts between setup and finish; `train` is the loop."""

    def __init__(self, cfg: DictConfig, run_dir: Path, overrides: list[str], dist: D.DistInfo) -> None:
        self.cfg, self.run_dir, self.overrides, self.dist = cfg, run_dir, overrides, dist
        self.config_hash = config_hash(cfg)
        self.started = False  # True once work began: errors after it are failures (1), not usage (2)
        self.t_start = time.monotonic()
        self.traceback: str | None = None  # of the exception that ended the run, for summary.json
        # Progress: fresh here, replaced by the checkpoint's when setup resumes.
        self.state = TrainerState(world_size=dist.world_size, backend=choice_str(cfg.backend.name),
                                  config_hash=self.config_hash, finetune=choice_str(cfg.finetune.name))
        self.wall_before = 0.0  # wall time of earlier attempts
        self.resumed_from_step: int | None = None
        self.step_flops = 0.0  # model FLOPs of the current global batch, all ranks
        self._rows: dict[int, list[list[int]]] = {}  # the rows of one epoch (the latest asked for)
        self._lengths: dict[int, np.ndarray] = {}  # example lengths by id(dataset)
        # Built by setup, in this order. The loop uses them all; finish closes or reads those that
        # may be missing after a failed setup, so they start as None.
        self.device: torch.device
        self.hardware: Resolved | None = None  # the hardware facts, resolved for self.device
        self.precision: str
        self.tokenizer: PreTrainedTokenizerFast
        self.spec: ModelSpec
        self.facts: ModelFacts
        self.adapter_facts: AdapterFacts | None  # finetune=lora/qlora: the frozen base and what trains
        self.peak_tflops: float
        self.data: PreparedData | None = None
        self.text_budget: dict[str, Any] = {}  # trainer.bytes_per_step: the measured ratio and what was held
        self.plan: StepPlan | None = None
        self.backend: Backend | None = None
        self.model: torch.nn.Module
        self.head: torch.nn.Module | None = None  # the LM head the chunked loss calls
        self.loss_chunks = 0  # head calls per micro-batch (`batch_split.loss_chunk_count`); 0: full logits
        self.n_trainable: int | None = None  # parameters that get gradients (all, for full fine-tuning)
        self.checkpoints: CheckpointManager
        self.peak_memory: PeakMemory
        self.stop: StopFlags | None = None
        self.tracker: Tracker | None = None

    # ---- setup: each part from its config section ------------------------------------------------
    def setup(self) -> None:
        """Each part in the order the next needs it; nothing heavy before the cheap checks."""
        self.device = D.select_device(self.cfg.trainer.device, self.dist)
        # The hardware section now holds the facts of the device this rank trains on.
        self.cfg, self.hardware = with_resolved_hardware(self.cfg, on_gpu=self.device.type == "cuda")
        cfg = self.cfg
        self.precision = resolve_precision(choice_str(cfg.trainer.precision), self.device)
        self.tokenizer = self._setup_tokenizer(cfg.model)
        check_fits(cfg, self.hardware)  # refuse what cannot fit the hardware, before anything is built
        self.spec = self._setup_model_spec(cfg.model)
        self.facts = model_facts_of(self.spec, cfg.model)
        self.adapter_facts = adapter_facts(self.facts, cfg.finetune)  # a frozen base costs 4N, not 6N
        if cfg.trainer.loss_chunk_tokens:  # the chunked loss calls the head: refuse a model without one now (exit 2)
            output_head(self.spec.build_meta())
        self.peak_tflops = peak_tflops(cfg.hardware, self.precision)
        heartbeat.beat("prepare_data")
        self.data = self._setup_data(cfg.data, cfg.template)
        self.text_budget = self._setup_text_budget(cfg.trainer)
        heartbeat.beat("setup")
        D.init_process_group(self.dist, self.device, cfg.launcher.dist_backend, cfg.launcher.collective_timeout_s)
        self.started = True

        torch.manual_seed(cfg.trainer.seed)
        self.plan = self._setup_plan(cfg.trainer)
        optim = self._setup_optimizer(cfg.optim)
        self.backend = backend_class(cfg)(cfg, self.dist, self.device, self.precision)
        self.model = self.backend.setup(self.spec, optim)
        self._setup_loss(cfg.trainer)
        self.n_trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.peak_memory = PeakMemory(self.device)
        self.checkpoints = self._setup_checkpoints(cfg.trainer)
        self._resume(cfg.trainer)
        self.stop = self._setup_stop(cfg.trainer)
        self.tracker = Tracker(cfg, self.run_dir, enabled=self.dist.is_main, overrides=self.overrides,
                               extra_config=self._derived_facts(), total_steps=self.plan.total,
                               start_step=self.state.step)

    def _setup_tokenizer(self, model_cfg: DictConfig) -> PreTrainedTokenizerFast:
        key = "model.tokenizer" if model_cfg.tokenizer else "model.path"
        return load_tokenizer(model_cfg.tokenizer or model_cfg.path, key=key)

    def _setup_model_spec(self, model_cfg: DictConfig) -> ModelSpec:
        """What to build (architecture, weights, attention), not yet built: the backend builds it."""
        spec = make_model_spec(model_cfg, vocab_size=len(self.tokenizer), device=self.device, precision=self.precision,
                               finetune=self.cfg.finetune, token_ids=token_ids(self.tokenizer),
                               seed=int(self.cfg.trainer.seed))
        spec.check_finetune()  # a target module the model lacks is usage (exit 2), found before any work
        return spec

    def _setup_data(self, data_cfg: DictConfig, template_cfg: DictConfig) -> PreparedData:
        cfg = self.cfg
        prepared = prepare(data_cfg, template_cfg, cfg.context.length, self.tokenizer,
                           cfg.model.tokenizer or cfg.model.path, count_text=cfg.trainer.bytes_per_step is not None)
        if len(prepared.train) == 0:
            raise UsageError(f"data: nothing left to train on after filtering ({prepared.path}/stats.json)")
        return prepared

    def _setup_text_budget(self, trainer_cfg: DictConfig) -> dict[str, Any]:
        """Under `trainer.bytes_per_step`, the tokens per step that carry that much text with this
        tokenizer, measured on the prepared train split (`vicuna_exp.text_budget`)."""
        if trainer_cfg.bytes_per_step is None:
            return {}
        return text_budget.derive(self.cfg, self.data.stats, self.dist.world_size)

    def _setup_plan(self, trainer_cfg: DictConfig) -> StepPlan:
        t = trainer_cfg
        return plan_steps(lambda epoch: len(self.epoch_rows(epoch)), global_batch_size=global_batch_size(self.cfg),
                          context_length=self.cfg.context.length, epochs=t.epochs, token_budget=t.token_budget,
                          max_steps=t.max_steps)

    def _setup_optimizer(self, optim_cfg: DictConfig) -> OptimizerSpec:
        o, total = optim_cfg, self.plan.total
        warmup = o.warmup_steps if o.warmup_steps is not None else math.ceil(o.warmup_ratio * total)
        return OptimizerSpec(
            lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps,
            fused=o.fused and self.device.type == "cuda",
            lr_lambda=lr_multiplier(o.schedule, total_steps=total, warmup_steps=warmup, min_ratio=o.min_lr_ratio))

    def _setup_loss(self, trainer_cfg: DictConfig) -> None:
        """The chunked loss needs the LM head as a module; the full-logits path (0) needs nothing."""
        if trainer_cfg.loss_chunk_tokens:
            self.head = output_head(self.backend.module)
            self.loss_chunks = loss_chunk_count(trainer_cfg.micro_batch_size, self.cfg.context.length,
                                                trainer_cfg.loss_chunk_tokens)

    def _setup_checkpoints(self, trainer_cfg: DictConfig) -> CheckpointManager:
        return CheckpointManager(self.run_dir / CHECKPOINTS_DIR, keep_last=trainer_cfg.keep_last, dist=self.dist,
                                 expected_bytes=expected_checkpoint_bytes(self.cfg))

    def _resume(self, trainer_cfg: DictConfig) -> None:
        """Continue from a checkpoint (`trainer.resume`): its progress replaces the fresh state."""
        state = self.checkpoints.resume(str(trainer_cfg.resume), self.backend.load, config_hash=self.config_hash,
                                        finetune=self.state.finetune)
        if state is not None:
            self.state, self.resumed_from_step, self.wall_before = state, state.step, state.wall_s

    def _setup_stop(self, trainer_cfg: DictConfig) -> StopFlags:
        stop = StopFlags(grace_s=trainer_cfg.preempt_grace_s, single_process=not self.dist.is_distributed)
        stop.install()
        return stop

    def _derived_facts(self) -> dict[str, Any]:
        cfg, gbs = self.cfg, global_batch_size(self.cfg)
        return {"n_params": self.facts.total_params, "world_size": self.dist.world_size,
                "global_batch_size": gbs, "grad_accumulation": grad_accumulation_steps(cfg),
                "tokens_per_step": gbs * cfg.context.length, "precision": self.precision,
                "attn_implementation": self.spec.hf_config._attn_implementation, "attn_reason": self.spec.attn_reason,
                "total_steps": self.plan.total, "device": str(self.device),
                "finetune": choice_str(cfg.finetune.name), "trainable_params": self.n_trainable,
                "lr": cfg.optim.lr, "lr_source": cfg.optim.lr_source,
                "packing_efficiency": self.data.stats.get("packing_efficiency"), "data_hash": self.data.data_hash,
                **self.text_budget}

    # ---- the loop ------------------------------------------------------------------------------------
    def train(self) -> None:
        """One optimizer step per global batch until the plan is done; then evaluate, save and export."""
        t, state, total = self.cfg.trainer, self.state, self.plan.total
        self.peak_memory.reset()  # set-up's peak (loading, sharding) is not the training step's
        last_save = time.monotonic()
        while state.step < total:
            step = state.step + 1
            metrics = self.train_step(step)
            if step % t.log_every_steps == 0 or step == total:
                self.tracker.log(metrics)
            if t.eval_every_steps and step % t.eval_every_steps == 0 and step < total:
                self.evaluate()
            stop_signal, time_up, save_due = self._agree_flags(last_save)
            if stop_signal or time_up:
                self.save_checkpoint()
                why = (self.stop.reason or "a stop signal") if stop_signal else f"trainer.max_minutes={t.max_minutes} reached"
                raise TrainingInterrupted(f"stopped after step {step} ({why}); saved, resumable")
            if save_due or (t.save_every_steps and step % t.save_every_steps == 0):
                self.save_checkpoint()
                last_save = time.monotonic()
        self.evaluate()
        self.save_checkpoint()
        if t.save_final:
            self.export(self.run_dir / "final")

    def train_step(self, step: int) -> dict[str, Any]:
        """Global batch `step`: this rank's micro-batches forward and backward, then one optimizer step.
        Returns the step's metrics."""
        t, state, backend = self.cfg.trainer, self.state, self.backend
        heartbeat.beat("train", state.step)
        epoch, index = self.plan.position(step)
        micro = self.micro_batches(epoch, index)
        t0 = time.perf_counter()
        try:
            with self.stop.interruptible():
                loss, n_supervised, n_tokens = self.forward_backward(micro)
        except StopNow as e:  # the step would not finish in the grace period: keep the last one
            backend.zero_grad()
            self.save_checkpoint()
            raise TrainingInterrupted(f"stopped during step {step} ({e}); saved step {state.step}") from None
        if t.loss_spike_guard and not math.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss} at step {step} (epoch {epoch}); "
                                     f"last checkpoint: {self._latest_ckpt_name()}; weights were not updated")
        lr = backend.current_lr()  # the rate this step's update uses
        grad_norm = backend.step()
        step_s = time.perf_counter() - t0
        state.step, state.last_loss = step, loss
        state.tokens_seen += int(n_tokens)
        state.supervised_tokens_seen += int(n_supervised)
        state.model_flops += self.step_flops
        state.train_s += step_s
        self.stop.observe_step(step_s)
        W, slots = self.dist.world_size, global_batch_size(self.cfg) * self.cfg.context.length
        return {
            "step": step, "epoch": self.plan.epoch_progress(step),
            "loss": loss, "lr": lr, "grad_norm": grad_norm,
            "tokens": state.tokens_seen, "supervised_tokens": state.supervised_tokens_seen,
            "tokens_per_s": n_tokens / step_s, "supervised_tokens_per_s": n_supervised / step_s,
            "tokens_per_s_per_device": n_tokens / step_s / W, "step_s": step_s,
            "packing_efficiency": n_tokens / slots,  # real tokens / slots
            "tflops_per_device": achieved_tflops(self.step_flops, step_s, W),
            "mfu": mfu(self.step_flops, step_s, W, self.peak_tflops),
            "elapsed_s": self.wall_s(), **self._memory()}

    def micro_batches(self, epoch: int, index: int) -> list[dict[str, Any]]:
        """This rank's share of the global batch `index` of `epoch`, in micro-batches of at most
        `trainer.micro_batch_size` rows."""
        gbs, mb = global_batch_size(self.cfg), self.cfg.trainer.micro_batch_size
        rows = self.epoch_rows(epoch)[index * gbs:(index + 1) * gbs][self.dist.rank::self.dist.world_size]
        return [self.collate(rows[i:i + mb]) for i in range(0, len(rows), mb)]

    def forward_backward(self, micro: list[dict[str, Any]]) -> tuple[float, float, float]:
        """Accumulate gradients over this rank's micro-batches of one global batch.

        The loss is the sum of token losses divided once by the supervised-token count of the whole
        global batch (all ranks, all micro-batches), so every supervised token weighs the same however
        the batch is cut. Returns (mean loss, supervised tokens, real tokens) of the global batch.
        """
        # Counted on the host while collating; reduced and kept on the device, so the micro-batch
        # loop never waits for the GPU. The one sync of the step reads the loss at the end.
        counts = torch.tensor([sum(b["num_supervised"] for b in micro), sum(b["num_tokens"] for b in micro),
                               sum(b["model_flops"] for b in micro)], dtype=torch.float64)
        counts = D.all_reduce(counts.to(self.device, non_blocking=True))
        normaliser = counts[0].clamp(min=1.0).float()
        # float64: the logged loss then does not depend on how the batch is cut over ranks and
        # micro-batches (fp32 sums in another order differ in the last digits)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        for i, batch in enumerate(micro):
            with self.backend.accumulate(is_last=i == len(micro) - 1):
                token_loss = self.token_loss_sum(batch)
                self.backend.backward(token_loss / normaliser)
            loss_sum += token_loss.detach().double()
        D.all_reduce(loss_sum)
        loss_sum_host, n_supervised, n_tokens, self.step_flops = torch.cat(
            [loss_sum.double().reshape(1), counts]).tolist()
        return loss_sum_host / max(n_supervised, 1.0), n_supervised, n_tokens

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        if epoch not in self._rows:
            self._rows = {epoch: batching.epoch_rows(
                self.data.train, epoch=epoch, seed=self.cfg.trainer.seed, context_length=self.cfg.context.length,
                packing=self.cfg.data.packing, group_by_length=self.cfg.data.group_by_length)}
        return self._rows[epoch]

    def collate(self, rows: list[list[int]], dataset: Any = None) -> dict[str, Any]:
        """Tensors on the device, plus the real (unpadded) token count and model FLOPs of these rows."""
        dataset = self.data.train if dataset is None else dataset
        layout = batching.layout_for(self.spec.hf_config._attn_implementation, packing=self.cfg.data.packing,
                                     context_length=self.cfg.context.length)
        batch = batching.collate(dataset, rows, pad_id=pad_id(self.tokenizer), flatten=layout.flatten,
                                 pad_to=layout.pad_to)
        n_supervised = len(batch["loss_targets"])  # on the host, before the copy
        pin = self.device.type == "cuda"  # copies from pinned memory overlap with compute
        out: dict[str, Any] = {k: (v.pin_memory() if pin else v).to(self.device, non_blocking=True)
                               if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        seq_lens = self.lengths(dataset)[[i for row in rows for i in row]]
        out["num_supervised"] = n_supervised
        out["num_tokens"] = int(seq_lens.sum())
        head_tokens = n_supervised if self.loss_chunks else None  # the full path projects every token
        out["model_flops"] = batch_flops(self.facts, seq_lens.tolist(), head_tokens=head_tokens,
                                         adapters=self.adapter_facts)
        return out

    def lengths(self, dataset: Any) -> np.ndarray:
        key = id(dataset)
        if key not in self._lengths:
            self._lengths[key] = batching.example_lengths(dataset)
        return self._lengths[key]

    def token_loss_sum(self, batch: dict[str, Any], weight: float = 1.0) -> Any:
        """Summed next-token cross-entropy over supervised positions, in fp32 (see `vicuna_exp.loss`)."""
        with self.backend.autocast():
            if self.loss_chunks:
                token_loss = chunked_loss_sum(self.model, self.head, batch, self.loss_chunks)
            else:
                token_loss = full_loss_sum(self.model, batch)
        return token_loss * weight

    def evaluate(self) -> float | None:
        """Loss per supervised token on the held-out conversations; every rank joins every forward."""
        eval_ds = self.data.eval
        if eval_ds is None or len(eval_ds) == 0:
            return None
        heartbeat.beat("eval", self.state.step)
        cfg, W, rank, mb = self.cfg, self.dist.world_size, self.dist.rank, self.cfg.trainer.micro_batch_size
        rows = batching.epoch_rows(eval_ds, epoch=0, seed=cfg.trainer.seed, context_length=cfg.context.length,
                          packing=cfg.data.packing, group_by_length=True)
        if cfg.trainer.eval_max_rows:
            rows = rows[: cfg.trainer.eval_max_rows]
        mine = rows[rank::W]
        n_micro = math.ceil(len(rows) / (W * mb))
        loss_sum, supervised = torch.zeros((), dtype=torch.float64, device=self.device), 0.0
        with self.backend.evaluating():
            for i in range(n_micro):
                chunk, weight = mine[i * mb:(i + 1) * mb], 1.0
                if not chunk:  # this rank ran out: a zero-weight forward keeps collectives in step
                    chunk, weight = rows[:1], 0.0
                batch = self.collate(chunk, eval_ds)
                loss_sum += self.token_loss_sum(batch, weight).double()
                supervised += weight * batch["num_supervised"]
        totals = D.all_reduce(torch.stack([loss_sum, torch.tensor(supervised, dtype=torch.float64,
                                                                   device=self.device)])).tolist()
        eval_loss = totals[0] / max(totals[1], 1.0)
        state = self.state
        state.last_eval_loss = eval_loss
        if math.isfinite(eval_loss) and (state.best_eval_loss is None or eval_loss < state.best_eval_loss):
            state.best_eval_loss = eval_loss
        self.tracker.log({"step": state.step, "eval_loss": eval_loss, "eval_supervised_tokens": int(totals[1])})
        return eval_loss

    def _agree_flags(self, last_save: float) -> tuple[bool, bool, bool]:
        """Stop, time-limit and timed-save decisions, made the same on every rank."""
        t = self.cfg.trainer
        now = time.monotonic()
        flags = torch.tensor([
            float(self.stop.requested),
            float(t.max_minutes is not None and (now - self.t_start) / 60 >= t.max_minutes),
            float(t.save_every_minutes is not None and (now - last_save) / 60 >= t.save_every_minutes),
        ])
        D.all_reduce(flags, op="max")
        return tuple(bool(x) for x in flags.tolist())  # type: ignore[return-value]

    def wall_s(self) -> float:
        return self.wall_before + (time.monotonic() - self.t_start)

    def _memory(self) -> dict[str, float]:
        """This rank's peak memory since training started; the run's maximum goes to summary.json."""
        peak = self.peak_memory.peak_gb()
        self.state.peak_mem_gb = max(self.state.peak_mem_gb, peak)
        return {"peak_mem_gb": peak}

    def _utilisation(self) -> dict[str, float | None]:
        """Mean model TFLOP/s per device and MFU over all training steps (evaluation excluded)."""
        state = self.state
        if not state.train_s:
            return {"tflops_per_device": None, "mfu": None}
        W = self.dist.world_size
        return {"tflops_per_device": achieved_tflops(state.model_flops, state.train_s, W),
                "mfu": mfu(state.model_flops, state.train_s, W, self.peak_tflops)}

    def resumable(self) -> bool:
        """A complete checkpoint exists in the run dir, so the same command resumes from it."""
        return latest_checkpoint(self.run_dir) is not None

    def _latest_ckpt_name(self) -> str:
        done = self.checkpoints.complete()
        return str(done[-1]) if done else "none"

    # ---- checkpoints and export ----------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        heartbeat.beat("checkpoint", self.state.step)
        self.state.wall_s = self.wall_s()
        self.checkpoints.save(self.state, self.backend.save)

    def export(self, out_dir: Path) -> None:
        """One Hugging Face model with its tokenizer and the training chat template beside it; for an
        adapter method, the adapter first (`final_adapter/`), then the merged model in `out_dir`."""
        heartbeat.beat("export")
        dtype = torch_dtype(choice_str(self.cfg.trainer.export_dtype))
        if uses_adapters(self.cfg.finetune):
            adapter_dir = out_dir.parent / FINAL_ADAPTER_DIR
            with writing("the adapter", adapter_dir, self.n_trainable * 4, partial=adapter_dir):
                self.backend.export_adapter(adapter_dir)
                if self.dist.is_main:
                    write_tokenizer_files(self.cfg, self.tokenizer, adapter_dir)
                D.barrier()
        # A full disk removes the partial export; the final checkpoint is complete, so the rerun exports again.
        with writing("the final model", out_dir, self.facts.total_params * dtype.itemsize, partial=out_dir):
            if self.dist.is_main:
                out_dir.mkdir(parents=True, exist_ok=True)
            D.barrier()
            self.backend.export(out_dir, dtype)
            if self.dist.is_main:
                write_tokenizer_files(self.cfg, self.tokenizer, out_dir)
            D.barrier()

    # ---- the end, whatever happened ------------------------------------------------------------------
    def finish(self, status: RunStatus | str, error: str | None, code: int) -> None:
        """Rank 0 writes summary.json; every rank closes what setup built."""
        heartbeat.beat("finish")
        try:
            if self.dist.is_main:
                self._write_summary(self.summary(status, error, code))
        finally:
            if self.tracker is not None:
                self.tracker.finish(code)
            if self.backend is not None:
                self.backend.close()
            if self.stop is not None:
                self.stop.uninstall()
            D.destroy_process_group()

    def _write_summary(self, summary: Summary) -> None:
        """Through the tracker when there is one (wandb gets the totals too). On a full disk the
        outcome, at least, is seen on stderr."""
        try:
            if self.tracker is not None:
                self.tracker.write_summary(summary.to_dict())
            else:
                summary.write(self.run_dir)
        except OSError as e:
            print(f"vicuna-exp train: {SUMMARY_FILE} not written ({e}); the run ended {RunStatus(summary.status).value}"
                  f"{': ' + summary.error if summary.error else ''}", file=sys.stderr)

    def summary(self, status: RunStatus | str, error: str | None, code: int) -> Summary:
        """What summary.json says: the outcome, the progress so far, and what is known of the run."""
        data, planned = self.data, self.plan is not None
        return Summary.from_state(
            self.state, status=RunStatus(status), exit_code=code, error=error,
            total_steps=self.plan.total if planned else None, wall_s=round(self.wall_s(), 3),
            overrides=self.overrides, config_hash=self.config_hash, run_dir=str(self.run_dir),
            derived=self._derived_facts() if planned else None, **self._utilisation(),
            peak_mem_gb=round(self.state.peak_mem_gb, 4) if self.state.peak_mem_gb else None,
            hardware={"source": self.hardware.source, **self.hardware.facts} if self.hardware else None,
            data_stats=data.stats if data is not None else None,
            provenance=provenance(data_hash=data.data_hash if data is not None else None),
            resumed_from_step=self.resumed_from_step, traceback=self.traceback)
