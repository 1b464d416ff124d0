"""How one request is decoded: length, randomness, stopping."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """``temperature=0`` is greedy; ``top_p`` keeps the smallest set of tokens whose probability reaches it.

    Generation ends at ``max_tokens``, at the end-of-sequence token (unless ``ignore_eos``: benchmarks
    need a fixed output length), or when the text produced contains one of ``stop`` (which is cut off).
    ``n`` completions of one prompt share its blocks (forked after one prefill, copy-on-write after).
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.n < 1:
            raise ValueError(f"n={self.n} must be >= 1")
