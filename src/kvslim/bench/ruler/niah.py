"""RULER's needle-in-a-haystack family (niah_single_1/2/3, niah_multikey_1/2/3, niah_multivalue,
niah_multiquery): "One of the special magic {numbers} for {key} is: {value}." needles in one of three
haystacks, RULER's template (singular wording when one value is asked for), ``string_match_all``.

Haystacks: ``repeat`` (the pass-key filler "The grass is green. ..." one line per unit), ``essay``
(Paul Graham's essays, units are words, needles at sentence boundaries at depths drawn from RULER's 40
evenly spaced ones) and ``needle`` (distractor needles with random keys and values, one line per unit).
"""
from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from typing import Any

from . import essays, words
from .prompt import Parts
from .tasks import RulerTask, Rendered, register

NEEDLE = "One of the special magic {type_v} for {key} is: {value}."
REPEAT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
INSTRUCTION = ("Some special magic {type_v} are hidden within the following text. Make sure to memorize it. "
               "I will quiz you about the {type_v} afterwards.\n")
QUESTION = "What are all the special magic {type_v} for {query} mentioned in the provided text?"
ANSWER_PREFIX = " The special magic {type_v} for {query} mentioned in the provided text are"
DEPTHS = [round(100 * i / 39) for i in range(40)]
"""RULER's needle depths in percent: ``np.round(np.linspace(0, 100, 40))``."""


def value(kind: str, rng: random.Random) -> str:
    """A key or value as RULER draws it: a 7-digit number, an adjective-noun word pair or a uuid4."""
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return words.key(rng)
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def singular(text: str) -> str:
    """RULER's rewording of its template when a single value is asked for."""
    return text.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")


@dataclass(frozen=True)
class NiahDraw:
    keys: list[str]
    values: list[list[str]]
    needles: list[str]  # shuffled, in insertion order
    asked: list[int]  # indices of the keys the question asks for
    places: list[float]  # where each needle goes: a depth in percent (essay) or a fraction of the lines
    distractor_seed: int


class Niah(RulerTask):
    tokens_to_generate = 128

    def __init__(self, name: str, haystack: str, type_k: str, type_v: str, num_k: int = 1, num_v: int = 1,
                 num_q: int = 1) -> None:
        self.name, self.haystack, self.type_k, self.type_v = name, haystack, type_k, type_v
        self.num_k, self.num_v, self.num_q = max(num_k, num_q), num_v, num_q
        self.description = (f"{haystack} haystack, {type_k} keys, {type_v} values, {self.num_k} key(s), "
                            f"{num_v} value(s) each, {num_q} asked")

    def max_units(self, length: int) -> int | None:
        return len(essays.words()) if self.haystack == "essay" else None

    def first_guess(self, budget: int) -> int:
        # about 1.3 tokens per essay word, 24 per filler line, 20 to 40 per distractor needle
        per_unit = {"essay": 1.3, "repeat": 24, "needle": 30 if self.type_k != "uuids" else 60}[self.haystack]
        return max(1, int(budget / per_unit))

    def draw(self, rng: random.Random, length: int) -> NiahDraw:
        keys, values, needles = [], [], []
        while len(keys) < self.num_k:
            key = value(self.type_k, rng)
            if key in keys:  # a question must match one key only
                continue
            keys.append(key)
            values.append([value(self.type_v, rng) for _ in range(self.num_v)])
            needles += [NEEDLE.format(type_v=self.type_v, key=key, value=v) for v in values[-1]]
        rng.shuffle(needles)
        asked = rng.sample(range(self.num_k), self.num_q)
        if self.haystack == "essay":
            places = sorted(float(d) for d in rng.sample(DEPTHS, len(needles)))  # needle k at the k-th depth
        else:
            places = [rng.random() for _ in needles]
        return NiahDraw(keys, values, needles, asked, places, rng.getrandbits(64))

    def render(self, setup: Any, draw: NiahDraw, units: int) -> Rendered:
        if self.haystack == "essay":
            context = self._essay(draw, units)
        else:
            lines = [REPEAT] * units if self.haystack == "repeat" else self._distractors(draw.distractor_seed, units)
            # RULER inserts at sorted random line indices, last first
            for place, needle in sorted(zip(draw.places, draw.needles), key=lambda p: -p[0]):
                lines.insert(int(place * units), needle)
            context = "\n".join(lines)
        queries = [draw.keys[i] for i in draw.asked]
        query = queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]
        one = self.num_q * self.num_v == 1
        type_v = self.type_v[:-1] if one else self.type_v
        word = singular if one else str
        parts = Parts(word(INSTRUCTION).format(type_v=type_v) + context + "\n",
                      word(QUESTION).format(type_v=type_v, query=query),
                      word(ANSWER_PREFIX).format(type_v=type_v, query=query))
        meta = {"depths": [p / 100 if self.haystack == "essay" else p for p in draw.places], "query": query}
        return Rendered(parts, [v for i in draw.asked for v in draw.values[i]], meta)

    @staticmethod
    def _essay(draw: NiahDraw, units: int) -> str:
        """RULER's essay placement: the first ``units`` words as sentences, each needle after the sentence
        at its depth."""
        sents = essays.sentences(" ".join(essays.words()[:units]))
        cuts = [0] + sorted(int(len(sents) * d / 100) for d in draw.places) + [len(sents)]
        pieces: list[str] = []
        for i in range(1, len(cuts)):
            pieces.append(" ".join(sents[cuts[i - 1]:cuts[i]]))
            if i - 1 < len(draw.needles):
                pieces.append(draw.needles[i - 1])
        return " ".join(p for p in pieces if p)

    def _distractors(self, seed: int, units: int) -> list[str]:
        """The first ``units`` distractor needles of this sample (a prefix-stable stream)."""
        rng = random.Random(seed)
        return [NEEDLE.format(type_v=self.type_v, key=value(self.type_k, rng), value=value(self.type_v, rng))
                for _ in range(units)]


for _task in (
    Niah("niah_single_1", "repeat", "words", "numbers"),
    Niah("niah_single_2", "essay", "words", "numbers"),
    Niah("niah_single_3", "essay", "words", "uuids"),
    Niah("niah_multikey_1", "essay", "words", "numbers", num_k=4),
    Niah("niah_multikey_2", "needle", "words", "numbers"),
    Niah("niah_multikey_3", "needle", "uuids", "uuids"),
    Niah("niah_multivalue", "essay", "words", "numbers", num_v=4),
    Niah("niah_multiquery", "essay", "words", "numbers", num_q=4),
):
    register(_task)
