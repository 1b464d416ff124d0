"""RULER's frequent words extraction (fwe): a "coded text" of random six-letter words whose counts follow
a Zipf law (alpha 2); the most frequent word is "..." (noise the prompt says to ignore) and the answer is
the next three. Vocabulary of length/50 words, as RULER sizes it; ``string_match_all``."""
from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Any

from .prompt import Parts
from .tasks import RulerTask, Rendered, register

INSTRUCTION = ("Read the following coded text and track the frequency of each coded word. "
               "Find the three most frequently appeared coded words. ")
QUESTION = ("Question: Do not provide any explanation. Please ignore the dots '....'. "
            "What are the three most frequently appeared words in the above coded text?")
ANSWER_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
ALPHA = 2.0
WORD_LETTERS = 6


def zeta(alpha: float, terms: int = 100_000) -> float:
    """Riemann zeta for alpha > 1: the partial sum plus the integral of the tail (error below 1e-10 at 2)."""
    return sum(k ** -alpha for k in range(1, terms + 1)) + terms ** (1 - alpha) / (alpha - 1)


_ZETA = zeta(ALPHA)


@dataclass(frozen=True)
class CodedDraw:
    vocab: list[str]  # rank order: vocab[0] is the "..." noise word
    shuffle_seed: int


class FrequentWords(RulerTask):
    name = "fwe"
    description = "frequent words extraction: the 3 most frequent coded words of a Zipf(2) text"
    tokens_to_generate = 50
    min_units = 40  # the three answer words then appear 6, 2 and 1 times: distinct counts

    def first_guess(self, budget: int) -> int:
        return max(1, budget // 3)

    def draw(self, rng: random.Random, length: int) -> CodedDraw:
        size = max(4, length // 50)
        vocab: set[str] = set()
        while len(vocab) < size:
            vocab.add("".join(rng.choices(string.ascii_lowercase, k=WORD_LETTERS)))
        ranked = sorted(vocab)
        rng.shuffle(ranked)
        ranked[0] = "..."
        return CodedDraw(ranked, rng.getrandbits(64))

    def render(self, setup: Any, draw: CodedDraw, units: int) -> Rendered:
        """``units`` is RULER's ``num_words``: the word of rank k appears int(units * k^-alpha / zeta) times."""
        text = [w for k, w in enumerate(draw.vocab, 1) for _ in range(int(units * k ** -ALPHA / _ZETA))]
        random.Random(draw.shuffle_seed).shuffle(text)
        parts = Parts(INSTRUCTION + " ".join(text) + "\n", QUESTION, ANSWER_PREFIX)
        return Rendered(parts, draw.vocab[1:4], {"words": len(text)})


register(FrequentWords())
