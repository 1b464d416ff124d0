"""Hide facts at given depths in filler text, sized to a token budget: the shared core of the
needle-style tasks (passkey, needle, multikey, multivalue, vt)."""
from __future__ import annotations

import itertools
import random
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from .base import Template
from .fit import TokenCounter, fit
from .text import sentences


@dataclass(frozen=True)
class Fact:
    """A sentence to hide; ``depth`` 0.0 puts it before all filler, 1.0 after it."""

    depth: float
    text: str


@dataclass(frozen=True)
class Haystack:
    prompt: str
    context: str
    tokens: int


def build(
    length: int,
    count: TokenCounter,
    template: Template,
    filler: Callable[[], Iterable[str]],
    facts: Sequence[Fact],
) -> Haystack:
    """Fill the context from ``filler()`` so the whole prompt has ``length`` tokens (a few less at most),
    with ``facts`` placed at their depths; facts of equal depth keep their order."""

    def context(pieces: list[str]) -> str:
        return hide(pieces, facts, count)

    pieces, prompt, tokens = fit(length, count, filler, lambda p: template.render(context(p)))
    return Haystack(prompt, context(pieces), tokens)


def hide(pieces: list[str], facts: Sequence[Fact], count: TokenCounter) -> str:
    """Join ``pieces`` with each fact inserted at the piece boundary nearest its depth, measured in
    tokens (so depth means the same thing for long and short sentences)."""
    bounds = list(itertools.accumulate((count.piece(p) for p in pieces), initial=0))
    placed = list(pieces)
    # Insert from the back so earlier boundaries keep their indices.
    for fact in reversed(sorted(facts, key=lambda f: f.depth)):
        target = fact.depth * bounds[-1]
        i = bisect_left(bounds, target)
        if i > 0 and target - bounds[i - 1] < bounds[i] - target:
            i -= 1
        placed.insert(i, fact.text)
    return " ".join(placed)


def check_depths(depths: Sequence[float]) -> None:
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths={depths!r}: give a non-empty list of fractions in [0, 1], e.g. [0.0, 0.5, 1.0]")


def prose(rng: random.Random) -> Callable[[], Iterable[str]]:
    """The prose corpus as an endless (restartable) stream from a random sentence, wrapping around,
    so that samples differ in their haystacks too."""
    corpus = sentences()
    start = rng.randrange(len(corpus))
    return lambda: itertools.islice(itertools.cycle(corpus), start, None)
