"""The training recipe, top to bottom: build the parts in order, run the loop, close everything.

Launch (see `vicuna_exp.launch` for several processes):

    vicuna-exp train                                   # tiny model, sample data, CPU
    vicuna-exp train experiment=vicuna-7b model.path=/path/to/llama-7b-hf
    vicuna-exp train backend=fsdp launcher.nproc_per_node=8 context=2048

`main` is the Hydra job (one per run dir). With one process and no sharding it calls `run`
itself; otherwise it starts torchrun, and every rank calls `run` from `vicuna_exp.worker` with the resolved config
the job saved. `run` never parses configs, never branches on the backend, and calls the
tracker alone for metrics.
"""

from __future__ import annotations

import json
import logging
import math
import time
import traceback
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vicuna_exp.config import config_hash, global_batch_size, grad_accumulation_steps, validate
from vicuna_exp.errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    TrainingInterrupted,
    UsageError,
)
from vicuna_exp.tracking import write_json_atomic

log = logging.getLogger(__name__)
RESOLVED_CONFIG = "resolved_config.yaml"


# --------------------------------------------------------------------------------------------
# The Hydra job
# --------------------------------------------------------------------------------------------
def main(cfg: DictConfig) -> int:
    """`vicuna-exp train`: one run dir per job; skip it if already completed, else (re)start it."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    overrides = list(hc.overrides.task)
    try:
        validate(cfg)
    except UsageError as e:  # recorded, so a report over a multirun shows why this job did not run
        write_json_atomic(run_dir / "summary.json", {
            "status": "failed", "exit_code": EXIT_USAGE, "error": str(e), "steps": 0, "overrides": overrides,
            "config_hash": config_hash(cfg), "run_dir": str(run_dir)})
        raise
    finished = completed_summary(run_dir, config_hash(cfg))
    if finished is not None and cfg.trainer.resume == "auto":
        print(f"already completed: {run_dir} (final_loss {finished.get('final_loss')}); skipping. "
              "Use trainer.resume=never to train it again.")
        return EXIT_OK
    save_resolved_config(cfg, run_dir, overrides)
    # Sharding backends need a process group, even of one: torchrun provides it.
    if cfg.launcher.nproc_per_node * cfg.launcher.nnodes > 1 or cfg.backend.name != "single":
        from vicuna_exp.launch import launch

        code = launch(cfg, run_dir)
        report_outcome(run_dir)
        return code
    code, _ = run(cfg, run_dir, overrides)
    report_outcome(run_dir)
    return code


def report_outcome(run_dir: Path) -> None:
    """One line a person (or a script) can act on: what happened and where the run dir is."""
    try:
        s = json.loads((run_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return
    losses = ", ".join(f"{k} {s[k]:.4f}" for k in ("final_loss", "final_eval_loss") if s.get(k) is not None)
    print(f"{s.get('status')} after {s.get('steps')} steps{': ' + losses if losses else ''}; run dir: {run_dir}")


def completed_summary(run_dir: Path, cfg_hash: str) -> dict | None:
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if summary.get("status") == "completed" and summary.get("config_hash") == cfg_hash:
        return summary
    return None


def save_resolved_config(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> None:
    """What the ranks read: the config with every interpolation resolved, plus the overrides."""
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    payload = {"config": resolved, "overrides": overrides}
    (run_dir / RESOLVED_CONFIG).write_text(OmegaConf.to_yaml(OmegaConf.create(payload)))


def load_resolved_config(run_dir: Path) -> tuple[DictConfig, list[str]]:
    from vicuna_exp.config import VicunaConfig

    payload = OmegaConf.load(run_dir / RESOLVED_CONFIG)
    cfg = OmegaConf.merge(OmegaConf.structured(VicunaConfig), payload.config)
    assert isinstance(cfg, DictConfig)
    return cfg, list(payload.overrides)


# --------------------------------------------------------------------------------------------
# One rank's whole run
# --------------------------------------------------------------------------------------------
def run(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> tuple[int, str | None]:
    """Set up, train, and always write the summary and close the tracker.

    Returns (exit code, error). A usage error found before any work started is re-raised (exit 2).
    """
    from vicuna_exp import distributed as D

    recipe = Recipe(cfg, run_dir, overrides, D.from_env())
    status, error, code = "failed", None, EXIT_FAILED
    try:
        recipe.setup()
        recipe.train()
        status, code = "completed", EXIT_OK
    except TrainingInterrupted as e:
        status, error, code = "interrupted", str(e), EXIT_INTERRUPTED
    except UsageError as e:
        error, code = str(e), (EXIT_FAILED if recipe.started else EXIT_USAGE)
        recipe.finish(status, error, code)
        if code == EXIT_USAGE:
            raise
        return code, error
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
        recipe.traceback = traceback.format_exc()
        log.error("training failed: %s (traceback in %s)", error, run_dir / "summary.json")
    recipe.finish(status, error, code)
    return code, error


class Recipe:
    """Holds the parts between setup and finish; `train` is the loop."""

    def __init__(self, cfg: DictConfig, run_dir: Path, overrides: list[str], dist: Any) -> None:
        self.cfg, self.run_dir, self.overrides, self.dist = cfg, run_dir, overrides, dist
        self.started = False  # True once work began: errors after it are failures (1), not usage (2)
        self.tracker = None
        self.backend = None
        self.state = None
        self.traceback: str | None = None
        self.t_start = time.monotonic()
        self.wall_before = 0.0
        self.summary_extra: dict[str, Any] = {}
        self._lengths: dict[int, Any] = {}
        self.n_params: int | None = None

    # ---- setup: each step builds one part from one config section --------------------------
    def setup(self) -> None:
        import torch

        from vicuna_exp import distributed as D
        from vicuna_exp.backends import OptimizerSpec, backend_class, lr_multiplier
        from vicuna_exp.checkpoint import CheckpointManager, TrainerState
        from vicuna_exp.data.tokenizer import load_tokenizer
        from vicuna_exp.model import make_model_spec, model_facts_of, resolve_precision
        from vicuna_exp.plan import check_fits
        from vicuna_exp.plan.flops import peak_tflops
        from vicuna_exp.preemption import StopFlags
        from vicuna_exp.tracking import Tracker

        cfg, dist = self.cfg, self.dist
        self.device = D.select_device(cfg.trainer.device, dist)
        self.precision = resolve_precision(_str(cfg.trainer.precision), self.device)
        tok_key = "model.tokenizer" if cfg.model.tokenizer else "model.path"
        self.tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path, key=tok_key)
        check_fits(cfg)  # refuse what cannot fit the hardware, before anything is built
        self.spec = spec = make_model_spec(cfg.model, vocab_size=len(self.tokenizer), device=self.device, precision=self.precision)
        self.facts = model_facts_of(spec, cfg.model)
        self.n_params = self.facts.total_params
        self.peak_tflops = peak_tflops(cfg.hardware, self.precision)
        self.data = self._prepare_data()
        D.init_process_group(dist, self.device, cfg.launcher.dist_backend)
        self.started = True

        torch.manual_seed(cfg.trainer.seed)
        self.total_steps, self.steps_per_epoch = self._plan_steps()
        warmup = cfg.optim.warmup_steps if cfg.optim.warmup_steps is not None else math.ceil(
            cfg.optim.warmup_ratio * self.total_steps)
        optim = OptimizerSpec(
            lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
            fused=cfg.optim.fused and self.device.type == "cuda",
            lr_lambda=lr_multiplier(cfg.optim.schedule, total_steps=self.total_steps, warmup_steps=warmup,
                                    min_ratio=cfg.optim.min_lr_ratio))
        self.backend = backend_class(cfg)(cfg, dist, self.device, self.precision)
        self.model = self.backend.setup(spec, optim)

        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", keep_last=cfg.trainer.keep_last, dist=dist)
        self.state = self._resume() or TrainerState(world_size=dist.world_size, backend=cfg.backend.name,
                                                     config_hash=config_hash(cfg))
        self.wall_before = self.state.wall_s
        self.stop = StopFlags(grace_s=cfg.trainer.preempt_grace_s, single_process=not dist.is_distributed)
        self.stop.install()
        self.tracker = Tracker(cfg, self.run_dir, enabled=dist.is_main, overrides=self.overrides,
                               extra_config=self._derived_facts(), total_steps=self.total_steps,
                               start_step=self.state.step)

    def _prepare_data(self) -> Any:
        from vicuna_exp.data.prepare import prepare

        cfg = self.cfg
        prepared = prepare(cfg.data, cfg.template, cfg.context.length, self.tokenizer,
                           cfg.model.tokenizer or cfg.model.path)
        if len(prepared.train) == 0:
            raise UsageError(f"data: nothing left to train on after filtering ({prepared.path}/stats.json)")
        return prepared

    def _plan_steps(self) -> tuple[int, list[int]]:
        """Optimizer steps per epoch from each epoch's exact rows; the last partial batch is dropped."""
        cfg, t = self.cfg, self.cfg.trainer
        gbs = global_batch_size(cfg)
        self._rows: dict[int, list[list[int]]] = {}
        first = len(self.epoch_rows(0)) // gbs
        if first == 0:
            raise UsageError(f"trainer.global_batch_size: {gbs} rows per step but the training split has only "
                             f"{len(self.epoch_rows(0))} rows; lower the batch size or add data")
        if t.token_budget is not None:  # as many steps (and epochs) as the budget of token slots buys
            total = max(1, t.token_budget // (gbs * cfg.context.length))
            per_epoch = []
            while sum(per_epoch) < total:
                per_epoch.append(len(self.epoch_rows(len(per_epoch))) // gbs)
        else:
            epochs = math.ceil(t.epochs)
            per_epoch = [len(self.epoch_rows(e)) // gbs for e in range(epochs)]
            per_epoch[-1] = max(1, int(per_epoch[-1] * (t.epochs - (epochs - 1))))
            total = sum(per_epoch)
        if t.max_steps is not None:
            total = min(total, t.max_steps)
        return total, per_epoch

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        from vicuna_exp.data.batching import epoch_rows

        if epoch not in self._rows:
            self._rows = {epoch: epoch_rows(self.data.train, epoch=epoch, seed=self.cfg.trainer.seed,
                                            context_length=self.cfg.context.length, packing=self.cfg.data.packing,
                                            group_by_length=self.cfg.data.group_by_length)}
        return self._rows[epoch]

    def _resume(self) -> Any:
        resume = self.cfg.trainer.resume
        if resume == "never":
            return None
        if resume != "auto":
            from vicuna_exp.checkpoint import CheckpointManager

            path = Path(resume)
            if not path.is_dir():
                raise UsageError(f"trainer.resume={resume}: no such checkpoint directory")
            candidates = CheckpointManager(path, keep_last=1, dist=self.dist).complete() or [path]
            state = self.checkpoints.load_latest(self.backend.load, candidates=candidates)
            if state is None:
                raise UsageError(f"trainer.resume={resume}: no loadable checkpoint there")
        else:
            self._set_aside_foreign_checkpoints()
            state = self.checkpoints.load_latest(self.backend.load)
        if state is not None:
            log.info("resumed from step %d (%s)", state.step, self.checkpoints.root)
            self.summary_extra["resumed_from_step"] = state.step
        return state

    def _set_aside_foreign_checkpoints(self) -> None:
        """Checkpoints of another configuration in this run dir are moved aside, not resumed:
        a job whose configuration changed trains again from the start."""
        from vicuna_exp import distributed as D

        done = self.checkpoints.complete()
        if not done:
            return
        theirs = json.loads((done[-1] / "trainer_state.json").read_text()).get("config_hash")
        ours = config_hash(self.cfg)
        if theirs and theirs != ours:
            if self.dist.is_main:
                aside = self.run_dir / f"checkpoints.config-{theirs}"
                log.warning("checkpoints in %s are of another configuration (%s, now %s): moved to %s; "
                            "training from the start", self.checkpoints.root, theirs, ours, aside)
                self.checkpoints.root.rename(aside)
            D.barrier()

    def _derived_facts(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"n_params": self.n_params, "world_size": self.dist.world_size,
                "global_batch_size": global_batch_size(cfg), "grad_accumulation": grad_accumulation_steps(cfg),
                "tokens_per_step": global_batch_size(cfg) * cfg.context.length, "precision": self.precision,
                "total_steps": self.total_steps, "device": str(self.device),
                "packing_efficiency": self.data.stats.get("packing_efficiency"), "data_hash": self.data.data_hash}

    # ---- the loop ----------------------------------------------------------------------------
    def train(self) -> None:
        from vicuna_exp.plan.flops import achieved_tflops, mfu
        from vicuna_exp.preemption import StopNow

        cfg, state, backend = self.cfg, self.state, self.backend
        t = cfg.trainer
        gbs, W, rank = global_batch_size(cfg), self.dist.world_size, self.dist.rank
        last_save = time.monotonic()
        while state.step < self.total_steps:
            step = state.step + 1
            epoch, index = self._position(step)
            rows = self.epoch_rows(epoch)[index * gbs:(index + 1) * gbs][rank::W]
            micro = [self.collate(rows[i:i + t.micro_batch_size]) for i in range(0, len(rows), t.micro_batch_size)]
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
            self.stop.observe_step(step_s)
            state.extra["model_flops"] = state.extra.get("model_flops", 0.0) + self.step_flops
            state.extra["step_s"] = state.extra.get("step_s", 0.0) + step_s
            if step % t.log_every_steps == 0 or step == self.total_steps:
                self.tracker.log({
                    "step": step, "epoch": round(epoch + (index + 1) / self.steps_per_epoch[epoch], 4),
                    "loss": loss, "lr": lr, "grad_norm": grad_norm,
                    "tokens": state.tokens_seen, "supervised_tokens": state.supervised_tokens_seen,
                    "tokens_per_s": n_tokens / step_s, "supervised_tokens_per_s": n_supervised / step_s,
                    "tokens_per_s_per_device": n_tokens / step_s / W, "step_s": step_s,
                    "packing_efficiency": n_tokens / (gbs * cfg.context.length),  # real tokens / slots
                    "tflops_per_device": achieved_tflops(self.step_flops, step_s, W),
                    "mfu": mfu(self.step_flops, step_s, W, self.peak_tflops),
                    "elapsed_s": self.wall_s(), **self._memory()})
            if t.eval_every_steps and step % t.eval_every_steps == 0 and step < self.total_steps:
                self.evaluate()
            stop_signal, time_up, save_due = self._agree_flags(last_save)
            if stop_signal or time_up:
                self.save_checkpoint()
                why = (self.stop.reason or "a stop signal") if stop_signal else f"trainer.max_minutes={t.max_minutes} reached"
                raise TrainingInterrupted(f"stopped after step {step} ({why}); rerun the same command to resume")
            if save_due or (t.save_every_steps and step % t.save_every_steps == 0):
                self.save_checkpoint()
                last_save = time.monotonic()
        self.evaluate()
        self.save_checkpoint()
        if t.save_final:
            self.export(self.run_dir / "final")

    def forward_backward(self, micro: list[dict[str, Any]]) -> tuple[float, float, float]:
        """Accumulate gradients over this rank's micro-batches of one global batch.

        The loss is the sum of token losses divided once by the supervised-token count of the whole
        global batch (all ranks, all micro-batches), so every supervised token weighs the same however
        the batch is cut. Returns (mean loss, supervised tokens, real tokens) of the global batch.
        """
        import torch

        from vicuna_exp import distributed as D

        counts = torch.tensor([float(sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)),
                               float(sum(b["num_tokens"] for b in micro)),
                               float(sum(b["model_flops"] for b in micro))], dtype=torch.float64)
        n_supervised, n_tokens, self.step_flops = D.all_reduce(counts).tolist()
        loss_sum = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro):
            with self.backend.accumulate(is_last=i == len(micro) - 1):
                token_loss = self.token_loss_sum(batch)
                self.backend.backward(token_loss / max(n_supervised, 1.0))
            loss_sum += token_loss.detach()
        loss = float(D.all_reduce(loss_sum.float().cpu()).item()) / max(n_supervised, 1.0)
        return loss, n_supervised, n_tokens

    def _position(self, step: int) -> tuple[int, int]:
        """(epoch, index within the epoch) of a 1-based global step: the data order is a function of it."""
        index = step - 1
        for epoch, n in enumerate(self.steps_per_epoch):
            if index < n:
                return epoch, index
            index -= n
        raise AssertionError(f"step {step} is past the planned {self.total_steps} steps")

    @property
    def pad_id(self) -> int:
        from vicuna_exp.data.tokenizer import pad_id

        return pad_id(self.tokenizer)

    def collate(self, rows: list[list[int]], dataset: Any = None) -> dict[str, Any]:
        """Tensors on the device, plus the real (unpadded) token count and model FLOPs of these rows."""
        from vicuna_exp.data.batching import collate
        from vicuna_exp.plan.flops import batch_flops

        dataset = self.data.train if dataset is None else dataset
        # flash-attention's varlen path sees example boundaries only in a single flattened row
        flatten = self.cfg.data.packing and self.spec.hf_config._attn_implementation == "flash_attention_2"
        batch = collate(dataset, rows, pad_id=self.pad_id, flatten=flatten)
        out: dict[str, Any] = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        seq_lens = self.lengths(dataset)[[i for row in rows for i in row]]
        out["num_tokens"] = int(seq_lens.sum())
        out["model_flops"] = batch_flops(self.facts, seq_lens.tolist())
        return out

    def lengths(self, dataset: Any) -> Any:
        from vicuna_exp.data.batching import example_lengths

        key = id(dataset)
        if key not in self._lengths:
            self._lengths[key] = example_lengths(dataset)
        return self._lengths[key]

    def token_loss_sum(self, batch: dict[str, Any], weight: float = 1.0) -> Any:
        """Summed next-token cross-entropy over supervised positions, computed in fp32."""
        import torch.nn.functional as F

        with self.backend.autocast():
            logits = self.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                attention_mask=batch.get("attention_mask"), use_cache=False).logits
        logits = logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                               ignore_index=-100, reduction="sum") * weight

    def evaluate(self) -> float | None:
        """Loss per supervised token on the held-out conversations; every rank joins every forward."""
        import torch

        from vicuna_exp import distributed as D
        from vicuna_exp.data.batching import epoch_rows

        eval_ds = self.data.eval
        if eval_ds is None or len(eval_ds) == 0:
            return None
        cfg, W, rank, mb = self.cfg, self.dist.world_size, self.dist.rank, self.cfg.trainer.micro_batch_size
        rows = epoch_rows(eval_ds, epoch=0, seed=cfg.trainer.seed, context_length=cfg.context.length,
                          packing=cfg.data.packing, group_by_length=True)
        if cfg.trainer.eval_max_rows:
            rows = rows[: cfg.trainer.eval_max_rows]
        mine = rows[rank::W]
        n_micro = math.ceil(len(rows) / (W * mb))
        totals = torch.zeros(2, dtype=torch.float64)
        with self.backend.evaluating():
            for i in range(n_micro):
                chunk, weight = mine[i * mb:(i + 1) * mb], 1.0
                if not chunk:  # this rank ran out: a zero-weight forward keeps collectives in step
                    chunk, weight = rows[:1], 0.0
                batch = self.collate(chunk, eval_ds)
                totals[0] += float(self.token_loss_sum(batch, weight))
                totals[1] += weight * float((batch["labels"][:, 1:] != -100).sum())
        D.all_reduce(totals)
        eval_loss = float(totals[0] / max(totals[1], 1.0))
        state = self.state
        state.last_eval_loss = eval_loss
        if math.isfinite(eval_loss) and (state.best_eval_loss is None or eval_loss < state.best_eval_loss):
            state.best_eval_loss = eval_loss
        self.tracker.log({"step": state.step, "eval_loss": eval_loss, "eval_supervised_tokens": int(totals[1])})
        return eval_loss

    def _agree_flags(self, last_save: float) -> tuple[bool, bool, bool]:
        """Stop, time-limit and timed-save decisions, made the same on every rank."""
        import torch

        from vicuna_exp import distributed as D

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
        import torch

        if self.device.type == "cuda":
            return {"peak_mem_gb": torch.cuda.max_memory_allocated(self.device) / 2**30}
        import psutil

        return {"peak_mem_gb": psutil.Process().memory_info().rss / 2**30}

    def _utilisation(self) -> dict[str, float | None]:
        """Mean model TFLOP/s per device and MFU over all training steps (evaluation excluded)."""
        from vicuna_exp.plan.flops import achieved_tflops, mfu

        extra = self.state.extra if self.state else {}
        if not extra.get("step_s"):
            return {"tflops_per_device": None, "mfu": None}
        W = self.dist.world_size
        return {"tflops_per_device": achieved_tflops(extra["model_flops"], extra["step_s"], W),
                "mfu": mfu(extra["model_flops"], extra["step_s"], W, self.peak_tflops)}

    def _latest_ckpt_name(self) -> str:
        done = self.checkpoints.complete()
        return str(done[-1]) if done else "none"

    # ---- checkpoints and export --------------------------------------------------------------
    def save_checkpoint(self) -> None:
        self.state.wall_s = self.wall_s()
        self.checkpoints.save(self.state, self.backend.save)

    def export(self, out_dir: Path) -> None:
        """One Hugging Face model with its tokenizer and the training chat template beside it."""
        import torch

        from vicuna_exp import distributed as D
        from vicuna_exp.export import write_tokenizer_files

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.cfg.trainer.export_dtype]
        if self.dist.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
        D.barrier()
        self.backend.export(out_dir, dtype)
        if self.dist.is_main:
            write_tokenizer_files(self.cfg, self.tokenizer, out_dir)
        D.barrier()

    # ---- the end, whatever happened ----------------------------------------------------------
    def finish(self, status: str, error: str | None, code: int) -> None:
        from vicuna_exp import distributed as D
        from vicuna_exp.provenance import provenance
        from vicuna_exp.tracking import write_json_atomic

        try:
            if self.dist.is_main:
                state = self.state
                summary = {
                    "status": status, "exit_code": code, "error": error,
                    "steps": state.step if state else 0,
                    "total_steps": getattr(self, "total_steps", None),
                    "final_loss": state.last_loss if state else None,
                    "final_eval_loss": state.last_eval_loss if state else None,
                    "best_eval_loss": state.best_eval_loss if state else None,
                    "tokens_seen": state.tokens_seen if state else 0,
                    "supervised_tokens_seen": state.supervised_tokens_seen if state else 0,
                    "wall_s": round(self.wall_s(), 3),
                    "overrides": self.overrides,
                    "config_hash": config_hash(self.cfg),
                    "run_dir": str(self.run_dir),
                    "derived": self._derived_facts() if getattr(self, "total_steps", None) else None,
                    **self._utilisation(),
                    "data_stats": getattr(getattr(self, "data", None), "stats", None),
                    "provenance": provenance(data_hash=getattr(getattr(self, "data", None), "data_hash", None)),
                    **self.summary_extra,
                }
                if self.traceback:
                    summary["traceback"] = self.traceback
                if self.tracker is not None:
                    self.tracker.write_summary(summary)
                else:
                    self.run_dir.mkdir(parents=True, exist_ok=True)
                    write_json_atomic(self.run_dir / "summary.json", summary)
        finally:
            if self.tracker is not None:
                self.tracker.finish(code)
            if self.backend is not None:
                self.backend.close()
            if getattr(self, "stop", None) is not None:
                self.stop.uninstall()
            D.destroy_process_group()


def _str(value: Any) -> str:
    return value.value if hasattr(value, "value") else str(value)

