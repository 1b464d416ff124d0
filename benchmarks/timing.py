"""What every GPU benchmark here measures the same way: the copy bandwidth its rooflines divide by, and wall time.

Scripts run as ``python benchmarks/NAME.py``, so this module is found beside them.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def copy_bandwidth(gib: float = 2.0, reps: int = 20) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written (median of ``reps`` timed with
    CUDA events after 3 warm-ups): the memory roofline every result is set against, measured in the same run."""
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for i in range(reps + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * gib * 2**30 / statistics.median(times)


def wall(fn: Callable[[], Any], iters: int) -> float:
    """Median milliseconds of ``fn`` from launch to a synchronized end, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)
