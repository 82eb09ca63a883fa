"""Pre-build DeepSpeed's C++ ops once, at set-up, so no run or test compiles them.

DeepSpeed JIT-compiles its ops on first use: on CPU `deepspeed_shm_comm` (every
`init_distributed`, about 50 s on 2 cores) and `cpu_adam` (ZeRO-Offload, about 75 s). Built
into `TORCH_EXTENSIONS_DIR` (default `<venv>/torch_extensions`, the Makefile's choice), later
loads take about a second.

    python -m vicuna_exp.backends.build_ops            # what `make setup` runs
    python -m vicuna_exp.backends.build_ops --check    # exit 1 if an op is not built yet
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

# op builder class name -> directory torch.utils.cpp_extension puts it in
CPU_OPS = {"ShareMemCommBuilder": "deepspeed_shm_comm", "CPUAdamBuilder": "cpu_adam"}
# torch's JIT build takes a `lock` file beside the op (a FileBaton: existence only, no owner); a build
# that was killed leaves it, and every later load of the op then waits on it forever. No build of
# these ops takes anywhere near this long, so an older lock is a dead build's.
STALE_LOCK_S = 15 * 60


def needed_ops(*, on_gpu: bool, offload_optimizer: bool) -> list[str]:
    """The JIT ops a DeepSpeed run loads: CPU Adam when the optimizer is offloaded, and the
    shared-memory communication op on a CPU (on CUDA, communication is nccl's and the optimizer
    torch's AdamW, so a GPU run without offload loads none)."""
    return (["CPUAdamBuilder"] if offload_optimizer else []) + ([] if on_gpu else ["ShareMemCommBuilder"])


def default_extensions_dir() -> Path:
    """Inside the virtualenv, so `make clean` removes it and two checkouts never share stale builds."""
    return Path(sys.prefix) / "torch_extensions"


def extensions_dir() -> Path:
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or default_extensions_dir())


def use_extensions_dir() -> Path:
    """Point torch's JIT loader at the project's op cache unless the user chose another one."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(default_extensions_dir()))
    return extensions_dir()


def is_built(op_dir_name: str) -> bool:
    """A built op is `<dir>/<name>/<name>.so`; a half-built one (no .so) does not count."""
    return (extensions_dir() / op_dir_name / f"{op_dir_name}.so").is_file()


def clear_stale_lock(op_dir_name: str, max_age_s: float = STALE_LOCK_S) -> Path | None:
    """Remove the op's build lock when it is older than any build (a killed build's); returns it if removed."""
    lock = extensions_dir() / op_dir_name / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return None
    if age < max_age_s:
        return None  # a build may be running now: wait for it as torch does
    try:
        lock.unlink()
    except OSError:
        return None
    log.warning("removed %s, left %.0f min ago by a DeepSpeed op build that did not finish; the op is built again",
                lock, age / 60)
    return lock


def op_status(builder_name: str) -> tuple[bool, bool]:
    """(compatible with this machine, already built or installed)."""
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder(builder_name)
    if builder is None:
        return False, False
    import deepspeed.ops

    installed = bool(getattr(deepspeed.ops, "__installed_ops__", {}).get(builder.NAME, False))
    return bool(builder.is_compatible(verbose=False)), installed or is_built(CPU_OPS.get(builder_name, builder.NAME))


def build(names: list[str]) -> dict[str, float]:
    """Load (building if needed) each op; returns seconds per op."""
    from deepspeed.accelerator import get_accelerator

    took = {}
    for name in names:
        builder = get_accelerator().create_op_builder(name)
        if builder is None or not builder.is_compatible(verbose=False):
            raise RuntimeError(f"DeepSpeed op {name} cannot be built on this machine (see `ds_report`)")
        clear_stale_lock(CPU_OPS.get(name, builder.NAME))
        t0 = time.perf_counter()
        builder.load(verbose=False)
        took[name] = time.perf_counter() - t0
    return took


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vicuna_exp.backends.build_ops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report; exit 1 if an op is missing")
    parser.add_argument("--ops", nargs="*", default=list(CPU_OPS), help="builder names (default: %(default)s)")
    args = parser.parse_args(argv)
    where = use_extensions_dir()
    if args.check:
        missing = [n for n in args.ops if not op_status(n)[1]]
        for n in args.ops:
            print(f"{n}: {'missing' if n in missing else 'built'} ({where})")
        return 1 if missing else 0
    for name, seconds in build(args.ops).items():
        print(f"{name}: ready in {seconds:.1f} s ({where})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
