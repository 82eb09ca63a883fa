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


@pytest.fixture(scope="session")
def real_vocabulary(pytestconfig):
    """`load(name)`: the real tokenizer `name` ("sentencepiece_32k", "llama3"; see vocabularies.py),
    built from its pinned package once under the test cache; a skip naming the package if it is missing."""
    from vicuna_exp.data import vocabularies
    from vicuna_exp.data.tokenizer import load_tokenizer

    loaded = {}
    cache = getattr(pytestconfig, "cache", None)  # none under -p no:cacheprovider: then this session's test cache
    root = cache.mkdir("vocabularies") if cache is not None else Path(os.environ["VICUNA_EXP_CACHE"]) / "vocabularies"

    def load(name: str):
        reason = vocabularies.missing(name)
        if reason:
            pytest.skip(reason)
        if name not in loaded:
            loaded[name] = load_tokenizer(str(vocabularies.build(name, root)))
        return loaded[name]

    return load


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


class Tmpfs:
    """A real tmpfs, mounted by the test (root only) so a disk fills, or refuses writes, for real."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.mounted = False

    def mount(self, size: str, *, read_only: bool = False) -> Path:
        import subprocess

        self.path.mkdir(parents=True, exist_ok=True)
        opts = f"size={size}" + (",ro" if read_only else "")
        if self.mounted:
            cmd = ["mount", "-o", f"remount,{opts}" + ("" if read_only else ",rw"), str(self.path)]
        else:
            cmd = ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(self.path)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            if not self.mounted:
                pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
            raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")
        self.mounted = True
        return self.path

    def unmount(self) -> None:
        import subprocess

        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], check=False)
            self.mounted = False


@pytest.fixture
def tmpfs(tmp_path: Path):
    """`tmpfs.mount("8m")`, `tmpfs.mount("16m")` again to resize it (or `read_only=True`)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    fs = Tmpfs(tmp_path / "tmpfs")
    try:
        yield fs
    finally:
        fs.unmount()
