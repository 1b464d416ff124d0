"""RULER's multi-key needle (niah_multikey_1; Hsieh et al., 2024): several "special magic number"
lines for different keys hidden in prose; the question asks for one key, the others are distractors.
A cache that keeps "a magic number" but not the right one fails here while passing ``needle``."""
from __future__ import annotations

import random
from typing import Any

from . import haystack, vocab
from .base import Draft, Task, Template, register
from .boundary import answer_prefix
from .fit import TokenCounter
from .text import SOURCE

INSTRUCTION = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards."
)


def magic_line(key: str, number: str) -> str:
    return f"One of the special magic numbers for {key} is: {number}."


@register
class MultiKey(Task):
    name = "multikey"
    description = "Retrieve the magic number of one key among several keyed magic numbers hidden in prose."
    max_new_tokens = 16
    options = {"keys": 4}
    """``keys``: how many keyed lines to hide (RULER uses 4); one is asked for."""

    def _check(self, opts: dict[str, Any]) -> None:
        self._require_positive(opts, "keys")

    def _sample(self, i: int, rng: random.Random, length: int, count: TokenCounter, **opts: Any) -> Draft:
        keys = vocab.keys(rng, opts["keys"])
        numbers = vocab.numbers(rng, opts["keys"], 7)
        facts = [haystack.Fact(rng.random(), magic_line(k, v)) for k, v in zip(keys, numbers)]
        asked = rng.randrange(len(keys))
        template = Template(
            INSTRUCTION,
            f"What is the special magic number for {keys[asked]} mentioned in the provided text?",
            answer_prefix(f"The special magic number for {keys[asked]} mentioned in the provided text is",
                          count.tokenizer),
        )
        h = haystack.build(length, count, template, haystack.prose(rng), facts)
        meta = {"key": keys[asked], "depth": facts[asked].depth, "needle": facts[asked].text, "source": SOURCE}
        return Draft(h.prompt, numbers[asked], h.tokens, {**meta, **template.meta(h.context)})
