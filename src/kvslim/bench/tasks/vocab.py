"""Names and numbers planted in contexts. Keys are drawn without replacement per sample, so a
question never matches two facts, and values have a fixed digit count, so a value cannot hide
inside another one."""
from __future__ import annotations

import random
import string

CITIES = (
    "Amsterdam", "Athens", "Auckland", "Baghdad", "Bangkok", "Barcelona", "Beijing", "Berlin", "Bogota",
    "Boston", "Brussels", "Budapest", "Buenos Aires", "Cairo", "Cape Town", "Caracas", "Chicago",
    "Copenhagen", "Dakar", "Delhi", "Dhaka", "Dubai", "Dublin", "Hanoi", "Havana", "Helsinki", "Istanbul",
    "Jakarta", "Karachi", "Kyiv", "Lagos", "Lima", "Lisbon", "London", "Madrid", "Manila", "Melbourne",
    "Mexico City", "Montreal", "Moscow", "Mumbai", "Nairobi", "Oslo", "Paris", "Prague", "Quito",
    "Reykjavik", "Riyadh", "Rome", "Santiago", "Seoul", "Shanghai", "Singapore", "Stockholm", "Sydney",
    "Taipei", "Tehran", "Tokyo", "Toronto", "Vienna", "Warsaw", "Zurich",
)

_ADJECTIVES = (
    "abundant ancient bitter brave calm clever crooked curious dusty eager faint fierce fragile gentle "
    "giant glossy hollow humble icy jolly lazy lively lonely loud misty noisy odd pale proud quiet rapid "
    "rusty shiny silent sleepy smooth sour steady sticky swift tame tender tidy vivid wandering wild"
).split()
_NOUNS = (
    "anchor badger beacon biscuit canyon cobbler comet cricket dolphin ember falcon feather garden "
    "glacier harbor hazel island jaguar kettle lantern lemon lion maple meadow mirror nickel orchid otter "
    "pebble pepper quartz raven river saddle salmon tiger tulip valley walnut willow zebra"
).split()

KEY_COUNT = len(_ADJECTIVES) * len(_NOUNS)
"""How many distinct keys :func:`keys` can draw."""


def keys(rng: random.Random, k: int) -> list[str]:
    """RULER-style keys such as ``"swift-otter"``."""
    pairs = rng.sample(range(len(_ADJECTIVES) * len(_NOUNS)), k)
    return [f"{_ADJECTIVES[p // len(_NOUNS)]}-{_NOUNS[p % len(_NOUNS)]}" for p in pairs]


def numbers(rng: random.Random, k: int, digits: int) -> list[str]:
    """``k`` distinct numbers of exactly ``digits`` digits."""
    return [str(x) for x in rng.sample(range(10 ** (digits - 1), 10**digits), k)]


def variables(rng: random.Random, k: int) -> list[str]:
    """``k`` distinct five-letter upper-case names, as RULER's variable tracking uses."""
    names: set[str] = set()
    out = []
    while len(out) < k:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names:
            names.add(name)
            out.append(name)
    return out


def made_up_words(rng: random.Random, k: int) -> list[str]:
    """``k`` distinct pronounceable six-letter non-words (three consonant-vowel syllables); equal length
    means no word is part of another, so scoring by substring is exact."""
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words: set[str] = set()
    out = []
    while len(out) < k:
        word = "".join(rng.choices(syllables, k=3))
        if word not in words:
            words.add(word)
            out.append(word)
    return out
