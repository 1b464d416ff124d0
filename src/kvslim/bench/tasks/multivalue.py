"""RULER's multi-value needle (niah_multivalue): one key has several magic numbers hidden at different
depths in prose, and all must be returned. Tests whether a cache keeps every occurrence of a fact,
not just the most salient one; scored as the fraction of values found."""
from __future__ import annotations

import random
from typing import Any

from . import haystack, vocab
from .base import Draft, Task, Template, register
from .boundary import answer_prefix
from .fit import TokenCounter
from .multikey import INSTRUCTION, magic_line
from .text import SOURCE


@register
class MultiValue(Task):
    name = "multivalue"
    description = "Retrieve all magic numbers of one key, hidden at several depths in prose."
    max_new_tokens = 96
    options = {"values": 4}
    """``values``: how many numbers the key has (RULER uses 4)."""

    def _check(self, opts: dict[str, Any]) -> None:
        self._require_positive(opts, "values")

    def _sample(self, i: int, rng: random.Random, length: int, count: TokenCounter, **opts: Any) -> Draft:
        key = vocab.keys(rng, 1)[0]
        numbers = vocab.numbers(rng, opts["values"], 7)
        facts = [haystack.Fact(rng.random(), magic_line(key, v)) for v in numbers]
        template = Template(
            INSTRUCTION,
            f"What are all the special magic numbers for {key} mentioned in the provided text?",
            answer_prefix(f"The special magic numbers for {key} mentioned in the provided text are", count.tokenizer),
        )
        h = haystack.build(length, count, template, haystack.prose(rng), facts)
        meta = {"key": key, "depths": [f.depth for f in facts], "source": SOURCE}
        return Draft(h.prompt, numbers, h.tokens, {**meta, **template.meta(h.context)})
