"""Size a haystack to a token budget: the largest number of haystack units whose prompt fits.

RULER grows the haystack in fixed steps (500 essay words, 25 sentences) until the next step overflows,
which leaves up to a step of slack; a bisection lands on the last unit instead, so every task fills its
length almost exactly. The previous sample's size is the starting guess, so a task's samples after the
first cost a handful of tokenizations each.
"""
from __future__ import annotations

from collections.abc import Callable


def largest_fitting(tokens: Callable[[int], int], budget: int, guess: int, low: int = 1,
                    high: int | None = None) -> int:
    """Largest ``n`` in [low, high] with ``tokens(n) <= budget`` (``tokens`` grows with ``n``)."""
    if tokens(low) > budget:
        raise ValueError(f"needs {tokens(low)} tokens with the smallest haystack, over the budget of {budget}")
    guess = max(low, guess if high is None else min(guess, high))
    step = max(1, guess // 64)
    if tokens(guess) <= budget:  # gallop up to a size that overflows (or the cap)
        lo, hi = guess, guess + step
        while (high is None or hi <= high) and tokens(hi) <= budget:
            lo, step = hi, step * 2
            hi = lo + step
        if high is not None and hi > high:
            if tokens(high) <= budget:
                return high
            hi = high
    else:  # gallop down to a size that fits
        hi, lo = guess, max(low, guess - step)
        while tokens(lo) > budget:
            hi, step = lo, step * 2
            lo = max(low, lo - step)
    while hi - lo > 1:  # tokens(lo) fits, tokens(hi) does not
        mid = (lo + hi) // 2
        if tokens(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo
