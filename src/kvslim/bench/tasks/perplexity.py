"""Perplexity chunks: contiguous real prose of ``length`` tokens, for the harness to score by
log-likelihood (not a generation task). The text is the Python reference documentation shipped with
CPython (``pydoc_data.topics``, see :mod:`.text`), so it needs no download and is not synthetic."""
from __future__ import annotations

import itertools
import random
from typing import Any

from .base import Draft, Sample, Task, register
from .fit import TokenCounter, fit
from .text import SOURCE, sentences


@register
class Perplexity(Task):
    name = "perplexity"
    description = "Chunks of real English prose; the harness computes perplexity on them."
    max_new_tokens = 0

    def score(self, sample: Sample, output: str) -> float:
        raise TypeError("perplexity is measured by the harness from log-likelihoods, not scored from an output")

    def _sample(self, i: int, rng: random.Random, length: int, count: TokenCounter, **opts: Any) -> Draft:
        corpus = sentences()
        start = rng.randrange(len(corpus))
        # One pass from a random sentence, wrapping once: a chunk never repeats text, which would
        # make perplexity look better than it is.
        _, prompt, tokens = fit(
            length, count, lambda: itertools.islice(itertools.cycle(corpus), start, start + len(corpus)), " ".join
        )
        return Draft(prompt, "", tokens, {"kind": "perplexity", "source": SOURCE, "start": start})
