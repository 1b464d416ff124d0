"""RULER's variable tracking (vt): a chain "VAR ABCDE = 12345", "VAR FGHIJ = VAR ABCDE ", ... (one chain,
four hops) hidden among repeated filler lines; the model names every variable holding the value. RULER
puts a worked example (three-letter names, about 500 tokens, whitespace collapsed, answer included) at the
start of the same user turn, before the task; ``string_match_all``."""
from __future__ import annotations

import random
import string
from dataclasses import dataclass

from .fit import largest_fitting
from .prompt import Framing, Parts
from .tasks import RulerTask, Rendered, register

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
INSTRUCTION = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
QUESTION = "Question: Find all variables that are assigned the value {value} in the text above."
ANSWER_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
                 "are assgined the value {value}, they are: ")
"""RULER's wording, its spelling of "assgined" included: the model sees exactly RULER's prompt."""
EXAMPLE_LENGTH = 500
"""RULER's one-shot example is generated at max_seq_length 500 (minus the 30 tokens to generate)."""


@dataclass(frozen=True)
class Chain:
    names: list[str]
    value: str
    places: list[float]  # sorted fractions of the filler lines where the assignments go

    def lines(self) -> list[str]:
        return [f"VAR {self.names[0]} = {self.value}"] + [f"VAR {b} = VAR {a} " for a, b in
                                                          zip(self.names, self.names[1:])]


def draw_chain(rng: random.Random, hops: int, letters: int) -> Chain:
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names:
            names.append(name)
    return Chain(names, str(rng.randint(10000, 99998)), sorted(rng.random() for _ in range(hops + 1)))


def context(chain: Chain, units: int) -> str:
    """``units`` filler lines with the chain's assignments inserted in order (RULER: insert at sorted
    random positions, each shifted by the assignments already inserted)."""
    lines = [NOISE] * units
    for j, (place, line) in enumerate(zip(chain.places, chain.lines())):
        lines.insert(int(place * units) + j, line)
    return " ".join(lines).replace(". \n", ".\n")


def parts(chain: Chain, units: int, example: str = "") -> Parts:
    return Parts(example + INSTRUCTION + context(chain, units) + "\n", QUESTION.format(value=chain.value),
                 ANSWER_PREFIX.format(num_v=len(chain.names), value=chain.value))


class VariableTracking(RulerTask):
    name = "vt"
    description = "variable tracking: 1 chain of 4 hops in repeated filler, one-shot example"
    tokens_to_generate = 30
    hops = 4

    def first_guess(self, budget: int) -> int:
        return max(1, budget // 24)

    def setup(self, rng: random.Random, length: int, framing: Framing) -> str:
        """The worked example, as RULER inserts it before the task: a chain of three-letter names in as much
        filler as fits 500 tokens, question, answer prefix and answer on one line, then a blank line."""
        chain = draw_chain(rng, min(10, self.hops), 3)
        plain = Framing(framing.tokenizer, chat=False)
        budget = EXAMPLE_LENGTH - self.tokens_to_generate
        try:
            units = largest_fitting(lambda n: plain.tokens(parts(chain, n)), budget, budget // 24)
        except ValueError:  # a tokenizer too fine for 500 tokens (test stand-ins): the shortest example
            units = 1
        shot = parts(chain, units)
        return " ".join(f"{shot.context}{shot.question}{shot.answer_prefix} {' '.join(chain.names)}".split()) + "\n\n"

    def draw(self, rng: random.Random, length: int) -> Chain:
        return draw_chain(rng, self.hops, 5)

    def render(self, setup: str, draw: Chain, units: int) -> Rendered:
        return Rendered(parts(draw, units, setup), list(draw.names), {"value": draw.value, "depths": draw.places})


register(VariableTracking())
