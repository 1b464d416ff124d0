"""Word lists as RULER draws them, from the English lists that ``wonderwords`` ships.

Keys (``type_needle_k=words``) are "adjective-noun" pairs over its adjective and noun lists; common-words
extraction samples from nouns, adjectives and verbs together.
"""
from __future__ import annotations

import random
from functools import cache
from importlib import resources

INSTALL = "pip install wonderwords"


@cache
def _list(name: str) -> tuple[str, ...]:
    try:
        text = resources.files("wonderwords.assets").joinpath(name).read_text(encoding="utf-8")
    except ModuleNotFoundError:
        raise RuntimeError(f"RULER's word keys come from wonderwords' lists: {INSTALL}") from None
    return tuple(sorted({w.strip() for w in text.splitlines() if w.strip()}))


def nouns() -> tuple[str, ...]:
    return _list("nounlist.txt")


def adjectives() -> tuple[str, ...]:
    return _list("adjectivelist.txt")


def verbs() -> tuple[str, ...]:
    return _list("verblist.txt")


def key(rng: random.Random) -> str:
    """One RULER word key, uniform over adjective x noun (RULER lists all 6 million pairs and draws one;
    drawing the two indices gives the same distribution without building the list)."""
    adjs, ns = adjectives(), nouns()
    pick = rng.randrange(len(adjs) * len(ns))
    return f"{adjs[pick // len(ns)]}-{ns[pick % len(ns)]}"


@cache
def common_words() -> tuple[str, ...]:
    """RULER's pool for common-words extraction: nouns, adjectives and verbs, deduplicated and sorted."""
    return tuple(sorted(set(nouns()) | set(adjectives()) | set(verbs())))
