"""Reopening a prepared dataset from the cache, in one process: what the integrity check costs.

Side by side, interleaved, on one prepared entry of the packaged sample (or --data/--tokenizer):
  - `open_prepared`: the manifest's file sizes, `load_from_disk` (memory-mapped), the row counts;
  - the same without the manifest check (what a cache hit cost before issue 16);
  - `prepare()` on a cache hit: the above plus the config sections' validation and the cache key
    (the raw file's hash is memoised by path, size and mtime).

    python bench/bench_cache_reopen.py --repeat 50
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--context", type=int, default=512)
    args = parser.parse_args(argv)

    import dataclasses

    from vicuna_exp.data import cache
    from vicuna_exp.data.prepare import open_prepared, prepare
    from vicuna_exp.data.tokenizer import load_tokenizer
    from vicuna_exp.hydra_app import compose

    cfg = compose([])
    tok = load_tokenizer(cfg.model.tokenizer)
    data = dataclasses.replace(_as_obj(cfg.data), cache_dir=tempfile.mkdtemp(prefix="vx-reopen-"))
    entry = prepare(data, cfg.template, args.context, tok, cfg.model.tokenizer)
    path = Path(entry.path)
    check = cache.check_manifest

    def without_manifest() -> None:
        cache.check_manifest = lambda _entry: None  # type: ignore[assignment]
        try:
            open_prepared(path)
        finally:
            cache.check_manifest = check

    timed = {"open_prepared (with the manifest check)": lambda: open_prepared(path),
             "open_prepared without the manifest check": without_manifest,
             "prepare() on a cache hit": lambda: prepare(data, cfg.template, args.context, tok, cfg.model.tokenizer)}
    runs: dict[str, list[float]] = {k: [] for k in timed}
    for _ in range(args.repeat):
        for name, call in timed.items():
            t = time.perf_counter()
            call()
            runs[name].append(time.perf_counter() - t)
    base = statistics.median(runs["open_prepared without the manifest check"])
    print(f"{path} ({args.repeat} interleaved runs each, median and min in ms)")
    for name, r in runs.items():
        m = statistics.median(r)
        print(f"  {name:45s} {m * 1e3:7.2f} {min(r) * 1e3:7.2f}   {m / base:5.2f}x")
    return 0


def _as_obj(node):  # noqa: ANN001, ANN202 - the composed `data` node as its schema object
    from vicuna_exp.config import as_schema
    from vicuna_exp.data.config import DataConfig

    return as_schema(node, DataConfig, "data")


if __name__ == "__main__":
    raise SystemExit(main())
