"""What a RULER task is, and the registry of the eleven non-QA tasks under RULER's names.

A task draws everything random about a sample first (keys, values, positions as fractions, word orders),
then renders the input for any haystack size ``n``: fitting the length is then a search over ``n`` with the
draws fixed, so the same seed gives the same sample whatever the tokenizer's speed or the search's path.

RULER's QA tasks (qa_1 on SQuAD, qa_2 on HotpotQA) are left out: no reachable package ships those data sets.
"""
from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, TypeVar

from .fit import largest_fitting
from .prompt import Framing, Parts

QA_NOTE = ("RULER's QA tasks (qa_1: SQuAD, qa_2: HotpotQA) are not run: no package reachable from these "
           "machines ships either data set, and RULER's QA needs their real documents and questions.")


@dataclass(frozen=True)
class Rendered:
    """One input at one haystack size: its parts, the expected answers and what to record about it."""

    parts: Parts
    answers: list[str]
    meta: dict[str, Any]


@dataclass
class RulerSample:
    """A generated sample: token ids split for the two protocols, RULER's expected answers, and ``meta``
    (``length``: the target, ``tokens``: the input's real size, ``units``: the haystack size, task details)."""

    task: str
    id: str
    context_ids: list[int]
    question_ids: list[int]
    answers: list[str]
    meta: dict[str, Any]

    @property
    def prompt_ids(self) -> list[int]:
        return self.context_ids + self.question_ids


class RulerTask(ABC):
    """A RULER task. ``length`` is RULER's ``max_seq_length``: input tokens plus ``tokens_to_generate``."""

    name: str
    description: str
    tokens_to_generate: int
    metric: str = "string_match_all"

    def generate(self, n: int, length: int, framing: Framing, seed: int = 0) -> list[RulerSample]:
        """``n`` samples whose inputs (framed by ``framing``) hold the largest haystack that leaves the task's
        answer budget within ``length`` tokens. The same arguments always give the same samples."""
        if n < 1:
            raise ValueError(f"n={n}: ask for at least one sample")
        budget = length - self.tokens_to_generate
        rng = random.Random(f"ruler:{self.name}:{length}:{seed}")
        setup = self.setup(rng, length, framing)
        samples, guess = [], self.first_guess(budget)
        for i in range(n):
            draw = self.draw(rng, length)

            def tokens(units: int, draw: Any = draw) -> int:
                return framing.tokens(self.render(setup, draw, units).parts)

            try:
                units = largest_fitting(tokens, budget, guess, self.min_units, self.max_units(length))
            except ValueError as err:
                raise ValueError(f"length {length} is too short for RULER task {self.name}: it {err}; "
                                 "use a longer length") from None
            guess = units
            rendered = self.render(setup, draw, units)
            context, question = framing.ids(rendered.parts)
            meta = {"length": length, "seed": seed, "tokens": len(context) + len(question), "units": units,
                    "question_tokens": len(question), **rendered.meta}
            samples.append(RulerSample(self.name, f"{self.name}-{length}-{seed}-{i}", context, question,
                                       rendered.answers, meta))
        return samples

    min_units: int = 1

    def max_units(self, length: int) -> int | None:
        """Most haystack units the source has (None: unbounded)."""
        return None

    def first_guess(self, budget: int) -> int:
        """A starting haystack size for the search (about right saves tokenizations)."""
        return max(self.min_units, budget // 16)

    def setup(self, rng: random.Random, length: int, framing: Framing) -> Any:
        """Draws shared by every sample of a generate call (RULER's one-shot examples); default none."""
        return None

    @abstractmethod
    def draw(self, rng: random.Random, length: int) -> Any:
        """Everything random about one sample, drawn from ``rng``."""

    @abstractmethod
    def render(self, setup: Any, draw: Any, units: int) -> Rendered:
        """The input with a haystack of ``units`` units (pure: no randomness beyond ``draw``)."""


RULER_ORDER = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
               "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")
"""RULER's task list (its ``config_tasks.sh``) without qa_1 and qa_2: the order of every table."""

_TASKS: dict[str, RulerTask] = {}

T = TypeVar("T", bound=RulerTask)


def register(task: T) -> T:
    if task.name in _TASKS:
        raise ValueError(f"RULER task {task.name!r} is already registered")
    _TASKS[task.name] = task
    return task


def get_ruler_task(name: str) -> RulerTask:
    if name not in _TASKS:
        raise ValueError(f"unknown RULER task {name!r}; valid tasks: {', '.join(ruler_tasks())}")
    return _TASKS[name]


def ruler_tasks() -> list[str]:
    """Registered task names in RULER's order."""
    return sorted(_TASKS, key=lambda n: RULER_ORDER.index(n) if n in RULER_ORDER else len(RULER_ORDER))
