"""RULER's variable tracking: a chain "VAR A = 12345", "VAR B = VAR A", ... spread through prose;
the model must name every variable that ends up holding the value. It needs multi-hop reasoning
over facts far apart, which eviction policies that score tokens one by one tend to break."""
from __future__ import annotations

import random
from typing import Any

from . import haystack, vocab
from .base import Draft, Task, Template, register
from .fit import TokenCounter
from .text import SOURCE


@register
class VariableTracking(Task):
    name = "vt"
    description = "Name all variables assigned a value through a chain of assignments hidden in prose."
    max_new_tokens = 48
    options = {"hops": 4, "chains": 1}
    """``hops``: assignments after the first in each chain (RULER: 4); ``chains``: chains hidden, the first
    is asked about and the others are distractors with other values (RULER: 1)."""

    def _check(self, opts: dict[str, Any]) -> None:
        self._require_positive(opts, "hops", "chains")

    def _sample(self, i: int, rng: random.Random, length: int, count: TokenCounter, **opts: Any) -> Draft:
        size = opts["hops"] + 1
        names = vocab.variables(rng, size * opts["chains"])
        values = vocab.numbers(rng, opts["chains"], 5)
        facts = []
        for c, value in enumerate(values):
            chain = names[c * size : (c + 1) * size]
            lines = [f"VAR {chain[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
            # Sorted depths keep each chain in order, so it can be followed front to back.
            facts += [haystack.Fact(d, line) for d, line in zip(sorted(rng.random() for _ in lines), lines)]
        template = Template(
            "Memorize and track the chain(s) of variable assignment hidden in the following text.",
            f"Find all variables that are assigned the value {values[0]} in the text above.",
            f"According to the chain(s) of variable assignment in the text above, {size} variables are "
            f"assigned the value {values[0]}, they are:",
        )
        h = haystack.build(length, count, template, haystack.prose(rng), facts)
        meta = {"value": values[0], "depths": [f.depth for f in facts[:size]], "source": SOURCE}
        return Draft(h.prompt, names[:size], h.tokens, {**meta, **template.meta(h.context)})
