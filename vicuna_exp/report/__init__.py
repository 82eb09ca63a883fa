"""`vicuna-exp report SWEEP_DIR`: compare a sweep's jobs from their run dirs alone (no wandb server).

Kept import-light: the CLI imports this package; rich, matplotlib and wandb load only when used.
"""

from __future__ import annotations


def main(argv: list[str]) -> int:
    from vicuna_exp.report.command import main as _main

    return _main(argv)


__all__ = ["main"]
