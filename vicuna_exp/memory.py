"""Peak memory of this rank since its first training step: the figure the planner is checked against.

On CUDA it is the allocator's reserved peak (what the device must hold, fragmentation included),
with the peak statistics reset once set-up is done. On a CPU it is the peak resident set since the
reset of the kernel's high-water mark (`/proc/self/clear_refs`); where the kernel refuses that, the
peak since the process started, and a warning says so.
"""

from __future__ import annotations

import logging
from pathlib import Path

import psutil
import torch

log = logging.getLogger(__name__)
GIB = 2**30
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


class PeakMemory:
    """`reset()` when training starts; `peak_gb()` after each step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.since_start = False  # True when the CPU peak could not be reset

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            _CLEAR_REFS.write_text("5")  # 5: reset the peak resident set size (VmHWM)
        except OSError as e:
            self.since_start = True
            log.warning("peak_mem_gb is the peak since the process started: the kernel refused to reset "
                        "it (%s: %s)", _CLEAR_REFS, e)

    def peak_gb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_reserved(self.device) / GIB
        return _vm_hwm_bytes() / GIB


def _vm_hwm_bytes() -> float:
    """The peak resident set (VmHWM) of this process; the current one where /proc has no peak."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return float(psutil.Process().memory_info().rss)
