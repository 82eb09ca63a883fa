"""One log line per rank saying how much of the model it holds, read and buffered.

Sharding that silently does not happen (the failure of accelerate's FSDP plugin on CPU) shows
up here as a fraction of 1.0; the multi-process tests read these lines from the launch log.
"""

from __future__ import annotations

import json
import logging

import torch

log = logging.getLogger("vicuna_exp.backends")
PREFIX = "shard facts "


def optimizer_elements(optimizer: torch.optim.Optimizer) -> int:
    """Elements of per-parameter optimizer state (AdamW: exp_avg and exp_avg_sq) this rank holds."""
    total = 0
    for state in optimizer.state.values():
        for v in state.values():
            if torch.is_tensor(v) and v.ndim > 0:
                local = v.to_local() if hasattr(v, "to_local") else v
                total += local.numel()
    return total


def log_facts(**facts: object) -> None:
    log.info(PREFIX + json.dumps(facts, sort_keys=True))


def parse_facts(text: str) -> list[dict]:
    """All shard-facts records in a log (one per rank and export)."""
    out = []
    for line in text.splitlines():
        i = line.find(PREFIX)
        if i >= 0:
            out.append(json.loads(line[i + len(PREFIX):]))
    return out
