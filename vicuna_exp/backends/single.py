"""One process, one device: the reference every sharded backend is compared against."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from vicuna_exp.backends.base import Backend, OptimizerSpec, tensor_bytes
from vicuna_exp.model import ModelSpec


class SingleBackend(Backend):
    name = "single"

    def setup(self, spec: ModelSpec, optim: OptimizerSpec) -> torch.nn.Module:
        self.model = spec.build(self.device)
        self.optimizer = optim.build_adamw(self.model)
        self.scheduler = optim.build_scheduler(self.optimizer)
        return self.model

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        clip = float(self.cfg.trainer.grad_clip)
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm=clip if clip > 0 else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def current_lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def save(self, ckpt_dir: Path) -> None:
        # The same torch.distributed.checkpoint layout as FSDP, keyed by parameter name, so a
        # single-process checkpoint can be resumed sharded and the other way round.
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(ckpt_dir / "state"), no_dist=True)
        torch.save(self.scheduler.state_dict(), ckpt_dir / "scheduler.pt")

    def load(self, ckpt_dir: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=str(ckpt_dir / "state"), no_dist=True)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.scheduler.load_state_dict(torch.load(ckpt_dir / "scheduler.pt", weights_only=True))

    def export(self, out_dir: Path, dtype: torch.dtype) -> None:
        state = {k: v.detach().to(dtype) for k, v in self.model.state_dict().items()}
        self.model.save_pretrained(str(out_dir), state_dict=state, safe_serialization=True)
        config_path = out_dir / "config.json"
        import json

        config = json.loads(config_path.read_text())
        config["dtype"] = str(dtype).removeprefix("torch.")
        config["use_cache"] = True  # training turned it off; generation wants it on
        config_path.write_text(json.dumps(config, indent=2) + "\n")

    def state_bytes(self) -> dict[str, int]:
        params = list(self.model.parameters())
        grads = [p.grad for p in params if p.grad is not None]
        optim = [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim > 0]
        return {"params": tensor_bytes(iter(params)), "grads": tensor_bytes(iter(grads)),
                "optim": tensor_bytes(iter(optim))}
