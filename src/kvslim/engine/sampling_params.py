"""How one request is decoded: length, randomness, stopping."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

#: The smallest non-zero temperature: below it ``logits / temperature`` overflows float32 to inf, and
#: softmax turns inf into NaN probabilities that make sampling raise. 0.01 is already all but greedy.
MIN_TEMPERATURE = 0.01
SEED_RANGE = (-(2**63), 2**63 - 1)  # what torch.Generator.manual_seed takes, with room for the forks' seed + k


@dataclass
class SamplingParams:
    """``temperature=0`` is greedy; ``top_k`` keeps the k likeliest tokens (0: all), ``top_p`` the smallest
    set of tokens whose probability reaches it.

    Generation ends at ``max_tokens``, at the end-of-sequence token or one of ``stop_token_ids`` (unless
    ``ignore_eos``: benchmarks need a fixed output length; instruct models often end a turn with a token
    the tokenizer does not call its eos), or when the text produced contains one of ``stop`` (which is cut
    off; empty strings are dropped, as they would end every answer at once). ``n`` completions of one prompt
    share its blocks (forked after one prefill, copy-on-write after). Every value is checked here, so a
    bad one is a ValueError when the request is made, never an error inside an engine step.
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    seed: int | None = None
    top_k: int = 0
    stop_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.stop = [s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s]
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be a finite number >= 0 (0 is greedy)")
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise ValueError(f"temperature={self.temperature} is too small to sample with: use 0 for greedy "
                             f"or at least {MIN_TEMPERATURE}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 keeps every token)")
        if self.n < 1:
            raise ValueError(f"n={self.n} must be >= 1")
        low, high = SEED_RANGE
        if self.seed is not None and not low <= self.seed <= high:
            raise ValueError(f"seed={self.seed} does not fit in 64 bits: give an integer in [-2**63, 2**63 - 1]")
