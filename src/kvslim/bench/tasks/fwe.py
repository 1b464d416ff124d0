"""RULER's frequent-word extraction: a long "coded text" of made-up words drawn from a Zipf-like
distribution; the model must name the three most frequent. The answer depends on the whole context
rather than on one spot, which is where aggregate-losing cache compression shows."""
from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Iterator
from typing import Any

from . import vocab
from .base import Draft, Task, Template, register
from .fit import TokenCounter, fit

_ATTEMPTS = 50
"""Redraws allowed when the third and fourth most frequent words tie (likely only in short contexts)."""


@register
class FrequentWords(Task):
    name = "fwe"
    description = "Name the three most frequent made-up words in a long Zipf-distributed coded text."
    max_new_tokens = 32
    options = {"alpha": 2.0, "vocab": 200}
    """``alpha``: Zipf exponent, word of rank r has weight r**-alpha (RULER: 2.0); ``vocab``: number of
    distinct made-up words."""

    def _check(self, opts: dict[str, Any]) -> None:
        self._require_positive(opts, "vocab")
        if opts["vocab"] < 4:
            raise ValueError(f"vocab={opts['vocab']}: needs at least 4 words for a top 3 to mean anything")
        if not isinstance(opts["alpha"], (int, float)) or opts["alpha"] <= 0:
            raise ValueError(f"alpha={opts['alpha']!r}: give a positive Zipf exponent, e.g. alpha=2.0")

    def _sample(self, i: int, rng: random.Random, length: int, count: TokenCounter, **opts: Any) -> Draft:
        words = vocab.made_up_words(rng, opts["vocab"])
        weights = list(itertools.accumulate(r ** -opts["alpha"] for r in range(1, len(words) + 1)))
        template = Template(
            "Read the following coded text and track the frequency of each coded word. "
            "Find the three most frequently appeared coded words.",
            "What are the three most frequently appeared words in the above coded text?",
            "According to the coded text above, the three most frequently appeared words are:",
        )
        for _ in range(_ATTEMPTS):
            seed = rng.getrandbits(64)

            def stream(seed: int = seed) -> Iterator[str]:
                draws = random.Random(seed)
                while True:
                    yield from draws.choices(words, cum_weights=weights, k=256)

            text, prompt, tokens = fit(length, count, stream, lambda t: template.render(" ".join(t)))
            ranked = Counter(text).most_common(4)
            if len(ranked) >= 3 and (len(ranked) == 3 or ranked[2][1] > ranked[3][1]):
                top = [w for w, _ in ranked[:3]]
                meta = {"alpha": opts["alpha"], "vocab": opts["vocab"], "counts": dict(ranked[:3])}
                return Draft(prompt, top, tokens, {**meta, **template.meta(" ".join(text))})
        raise ValueError(
            f"length={length} is too short for fwe: no clear three most frequent words in {_ATTEMPTS} draws; "
            "use a longer length (a few hundred tokens or more)"
        )
