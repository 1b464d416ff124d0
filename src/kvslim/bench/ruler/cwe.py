"""RULER's common words extraction (cwe): a numbered list in which 10 words appear 30 times each and the
others 3 times (6 and 1 below 4k tokens); the model names the 10 common ones. RULER shows a one-shot
example first (40 words, 10 x 10 + 30 x 3); ``string_match_all``."""
from __future__ import annotations

import random
from dataclasses import dataclass

from . import words
from .prompt import Framing, Parts
from .tasks import RulerTask, Rendered, register

INSTRUCTION = ("Below is a numbered list of words. In these words, some appear more often than others. "
               "Memorize the ones that appear most often.\n")
QUESTION = "Question: What are the 10 most common words in the above list?"
ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
COMMON = 10


@dataclass(frozen=True)
class Setup:
    history: tuple[tuple[str, str], ...]  # the one-shot example
    repeats: tuple[int, int]  # how often a common and an uncommon word appear


@dataclass(frozen=True)
class WordDraw:
    order: list[str]  # a random order of the pool: the first ``units`` words are the sample's words
    shuffle_seed: int


def numbered(entries: list[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(entries))


def word_list(draw: WordDraw, units: int, common_repeats: int, uncommon_repeats: int) -> tuple[str, list[str]]:
    chosen = draw.order[:units]
    common = chosen[:COMMON]
    entries = common * common_repeats + chosen[COMMON:] * uncommon_repeats
    random.Random(draw.shuffle_seed).shuffle(entries)
    return numbered(entries), common


def _parts(text: str, history: tuple[tuple[str, str], ...] = ()) -> Parts:
    return Parts(INSTRUCTION + text + "\n", QUESTION, ANSWER_PREFIX, history)


class CommonWords(RulerTask):
    name = "cwe"
    description = "common words extraction: the 10 words repeated most in a numbered list, one-shot example"
    tokens_to_generate = 120
    min_units = COMMON + 1

    def max_units(self, length: int) -> int | None:
        return len(words.common_words())

    def first_guess(self, budget: int) -> int:
        return max(self.min_units, budget // 16)

    def _draw(self, rng: random.Random) -> WordDraw:
        pool = list(words.common_words())
        rng.shuffle(pool)
        return WordDraw(pool, rng.getrandbits(64))

    def setup(self, rng: random.Random, length: int, framing: Framing) -> Setup:
        long = length >= 4096
        size, repeats = (40, (10, 3)) if long else (20, (3, 1))
        text, common = word_list(self._draw(rng), size, *repeats)
        shot = _parts(text)
        return Setup(((shot.context + shot.question, numbered(common)),), (30, 3) if long else (6, 1))

    def draw(self, rng: random.Random, length: int) -> WordDraw:
        return self._draw(rng)

    def render(self, setup: Setup, draw: WordDraw, units: int) -> Rendered:
        text, common = word_list(draw, units, *setup.repeats)
        return Rendered(_parts(text, setup.history), common, {"words": units})


register(CommonWords())
