"""Needle in a haystack (Kamradt, 2023): one "special magic number" sentence hidden in real prose at a
grid of depths, so results can be plotted as accuracy over (length, depth)."""
from __future__ import annotations

import random
from typing import Any

from . import haystack, vocab
from .base import Draft, Task, Template, register
from .boundary import answer_prefix
from .fit import TokenCounter
from .text import SOURCE


@register
class Needle(Task):
    name = "needle"
    description = "Retrieve a 7-digit magic number for a city hidden in prose at a grid of depths."
    max_new_tokens = 16
    options = {"depths": [0.0, 0.25, 0.5, 0.75, 1.0]}
    """``depths``: sample ``i`` hides its needle at ``depths[i % len(depths)]``."""

    def _check(self, opts: dict[str, Any]) -> None:
        haystack.check_depths(opts["depths"])

    def _sample(self, i: int, rng: random.Random, length: int, count: TokenCounter, **opts: Any) -> Draft:
        depth = opts["depths"][i % len(opts["depths"])]
        city = rng.choice(vocab.CITIES)
        number = vocab.numbers(rng, 1, 7)[0]
        template = Template(
            "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the numbers afterwards.",
            f"What is the special magic number for {city} mentioned in the provided text?",
            answer_prefix(f"The special magic number for {city} mentioned in the provided text is", count.tokenizer),
        )
        fact = haystack.Fact(depth, f"The special magic number for {city} is {number}.")
        h = haystack.build(length, count, template, haystack.prose(rng), [fact])
        meta = {"depth": depth, "city": city, "needle": fact.text, "source": SOURCE}
        return Draft(h.prompt, number, h.tokens, {**meta, **template.meta(h.context)})
