"""Peak memory of one measured step, reset before each: what the step itself needed at most.

On a GPU this is ``torch.cuda.max_memory_allocated`` (tensors only, weights included). On a CPU it is the
process's peak resident set size. Linux lets a process reset that peak (``/proc/self/clear_refs``, since
Linux 4.0), which makes it per step; elsewhere only the lifetime peak of ``resource.getrusage`` exists,
and the ``kind`` recorded with each number says which one it is.
"""
from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


class PeakMemory:
    """``reset()`` before a step, ``read()`` after it: peak bytes and how they were measured."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else self._cpu_kind()

    @staticmethod
    def _cpu_kind() -> str:
        try:
            _CLEAR_REFS.write_text("5")
            _hwm_bytes()
            return "rss_peak"
        except (OSError, ValueError):
            return "rss_lifetime_peak"

    def reset(self) -> None:
        if self.kind == "cuda_max_allocated":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "rss_peak":
            _CLEAR_REFS.write_text("5")

    def read(self) -> int:
        if self.kind == "cuda_max_allocated":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.kind == "rss_peak":
            return _hwm_bytes()
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def _hwm_bytes() -> int:
    """VmHWM (peak resident set since the last reset) from /proc/self/status."""
    for line in _STATUS.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise ValueError("no VmHWM line in /proc/self/status")
