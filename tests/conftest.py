"""Shared fixtures: the real config composed with Hydra's compose API, shrunk for a CPU."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Tests never reach a wandb server and never share a cache with the user.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)
os.environ.setdefault("VICUNA_EXP_CACHE", tempfile.mkdtemp(prefix="vicuna-exp-test-cache-"))


@pytest.fixture(scope="session")
def cache_root() -> Path:
    return Path(os.environ["VICUNA_EXP_CACHE"])


# Small enough for seconds per run on 2 cores, big enough to learn the sample data.
TINY_OVERRIDES = [
    "logger=none",
    "trainer.max_steps=6",
    "trainer.micro_batch_size=4",
    "trainer.global_batch_size=8",
    "trainer.eval_every_steps=3",
    "trainer.eval_max_rows=16",
    "trainer.save_every_steps=3",
    "context=512",
]
