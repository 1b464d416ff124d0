"""Pass-key retrieval (Mohtashami & Jaggi, 2023): a five-digit key hidden in the classic repeated
filler. The easiest long-context test: if a KV-cache method fails it, nothing else will work."""
from __future__ import annotations

import itertools
import random
from typing import Any

from . import haystack, vocab
from .base import Draft, Task, Template, register
from .boundary import answer_prefix
from .fit import TokenCounter

FILLER = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)


@register
class PassKey(Task):
    name = "passkey"
    description = "Find a 5-digit pass key hidden in repeated filler text."
    max_new_tokens = 12
    options = {"depths": None}
    """``depths``: depths to cycle through over the samples; None draws one uniformly per sample."""

    def _check(self, opts: dict[str, Any]) -> None:
        if opts["depths"] is not None:
            haystack.check_depths(opts["depths"])

    def _sample(self, i: int, rng: random.Random, length: int, count: TokenCounter, **opts: Any) -> Draft:
        depths = opts["depths"]
        depth = rng.random() if depths is None else depths[i % len(depths)]
        key = vocab.numbers(rng, 1, 5)[0]
        template = Template(
            "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
            "I will quiz you about the important information there.",
            "What is the pass key?",
            answer_prefix("The pass key is", count.tokenizer),
        )
        fact = haystack.Fact(depth, f"The pass key is {key}. Remember it. {key} is the pass key.")
        h = haystack.build(length, count, template, lambda: itertools.cycle(FILLER), [fact])
        return Draft(h.prompt, key, h.tokens, {"depth": depth, "needle": fact.text, **template.meta(h.context)})
