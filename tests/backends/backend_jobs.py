"""Running `vicuna-exp train` as a real job (Hydra parent + torchrun + workers) from tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

TIMEOUT_S = 300

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@dataclass
class Job:
    run_dir: Path
    rc: int
    stderr: str
    seconds: float
    stopped_after: int | None = None  # the step seen when the job was signalled
    pids: set[int] = field(default_factory=set)  # every process of the job seen while it ran

    @property
    def summary(self) -> dict:
        return json.loads((self.run_dir / "summary.json").read_text())

    def losses(self) -> dict[int, float]:
        return train_losses(self.run_dir)


def save_tiny_llama(out: Path, *, hidden: int, intermediate: int, layers: int, kv_heads: int,
                    shard_size: str) -> Path:
    """A tiny random LLaMA in Hugging Face format with the packaged tokenizer, written in several
    safetensors files with an index (so the sharded loaders read more than one file)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from vicuna_exp.data.tokenizer import PACKAGED_TOKENIZER_DIR

    tok = AutoTokenizer.from_pretrained(str(PACKAGED_TOKENIZER_DIR))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=kv_heads,
                      max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(7)
    LlamaForCausalLM(cfg).save_pretrained(str(out), max_shard_size=shard_size)
    tok.save_pretrained(str(out))
    assert (out / "model.safetensors.index.json").is_file()
    return out


def train_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def last_step(run_dir: Path) -> int:
    try:
        text = (run_dir / "metrics.jsonl").read_text()
    except OSError:
        return 0
    steps = [json.loads(line)["step"] for line in text.splitlines() if line.endswith("}") and '"loss"' in line]
    return steps[-1] if steps else 0


def tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def workers_of(pid: int) -> dict[int, psutil.Process]:
    """rank -> worker process, for a running job."""
    out = {}
    for p in tree(pid):
        try:
            if "vicuna_exp.worker" in p.cmdline() and "RANK" in p.environ():
                out[int(p.environ()["RANK"])] = p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def run_job(run_dir: Path, overrides: list[str], *, cwd: Path,
            when: Callable[[int], bool] | None = None,
            action: Callable[[subprocess.Popen], None] | None = None) -> Job:
    """Start the job; if `when(step)` becomes true while it runs, call `action(proc)` once."""
    cmd = [sys.executable, "-m", "vicuna_exp", "train", *overrides, f"hydra.run.dir={run_dir}"]
    cwd.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    err_path = run_dir.parent / f"{run_dir.name}.stderr.{time.monotonic_ns()}"
    err_path.parent.mkdir(parents=True, exist_ok=True)
    pids: set[int] = set()
    stopped_after = None
    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=err)
        while proc.poll() is None:
            pids.update(p.pid for p in tree(proc.pid))
            if when is not None and stopped_after is None:
                step = last_step(run_dir)
                if when(step):
                    stopped_after = step
                    action(proc)
            if time.monotonic() - t0 > TIMEOUT_S:
                kill_tree(proc)
                raise TimeoutError(f"{cmd} ran for more than {TIMEOUT_S} s")
            time.sleep(0.05)
    return Job(run_dir, proc.returncode, err_path.read_text(), time.monotonic() - t0, stopped_after, pids)


def kill_tree(proc: subprocess.Popen) -> None:
    """A machine crash: SIGKILL to the job, torchrun and every worker at once."""
    for p in tree(proc.pid):
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def alive(pids: set[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            continue
    return out


def wait_gone(pids: set[int], timeout_s: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = alive(pids)
        if not left:
            return []
        time.sleep(0.1)
    return alive(pids)
