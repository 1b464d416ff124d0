"""Request latencies the engine records: time to first token (TTFT) and inter-token latency (ITL).

TTFT is from a request's arrival (``add_request``) to its first sampled token; an ITL is the time between
two consecutive tokens of one sequence. Chunked prefill trades them: a long prompt's chunks run beside the
decode steps of the others, so their ITL stays short while that prompt's TTFT grows. The engine keeps the
latest ``WINDOW`` values of each (a long-running server's percentiles follow its recent load) and reports
p50/p99 in its metrics.
"""
from __future__ import annotations

import threading
from collections import deque
from itertools import pairwise

import torch

#: values of each latency kept for the percentiles
WINDOW = 10_000


def percentiles(values: list[float], qs: tuple[float, ...] = (0.5, 0.99)) -> list[float | None]:
    """The ``qs`` quantiles of ``values`` (linear interpolation, as numpy's default); None for no values."""
    if not values:
        return [None] * len(qs)
    data = torch.tensor(list(values), dtype=torch.float64)
    return [float(torch.quantile(data, q)) for q in qs]


class LatencyStats:
    """The latest TTFTs and inter-token latencies, in seconds; the engine's thread adds, a server's reads."""

    def __init__(self, window: int = WINDOW):
        self.ttft: deque[float] = deque(maxlen=window)
        self.itl: deque[float] = deque(maxlen=window)
        self.lock = threading.Lock()

    def add(self, arrival: float, token_times: list[list[float]]) -> None:
        """Record one finished request: when it arrived and when each token of each completion was sampled (its
        ``n`` completions share their first token's time: one TTFT)."""
        firsts = [times[0] for times in token_times if times]
        with self.lock:
            if firsts:
                self.ttft.append(min(firsts) - arrival)
            for times in token_times:
                self.itl.extend(later - earlier for earlier, later in pairwise(times))

    def as_dict(self) -> dict[str, float | None]:
        with self.lock:
            ttft, itl = list(self.ttft), list(self.itl)
        ttft, itl = percentiles(ttft), percentiles(itl)
        return {"ttft_p50_s": ttft[0], "ttft_p99_s": ttft[1], "itl_p50_s": itl[0], "itl_p99_s": itl[1]}
