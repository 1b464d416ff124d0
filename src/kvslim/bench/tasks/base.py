"""What a task is: it generates :class:`Sample` s from a seed and scores a model's output on them.

Tasks register by name so the harness (and the command line) can pick them with a string.
"""
from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from .fit import TokenCounter, Tokenizer


@dataclass
class Sample:
    """One evaluation example. ``meta`` holds at least ``length`` (target context length in tokens),
    ``seed`` and ``tokens`` (the prompt's actual token count), plus task-specific keys such as ``depth``."""

    task: str
    id: str
    prompt: str
    answer: str | list[str]
    meta: dict[str, Any]


@dataclass(frozen=True)
class Template:
    """The plain-text prompt layout: instruction, context, then the question and an answer prefix, so a
    base model answers in a few tokens (numeric tasks end the prefix at the tokenizer's answer boundary:
    :func:`.boundary.answer_prefix`). The parts also go into ``meta`` so that the harness can re-wrap
    them with a chat template."""

    instruction: str
    question: str
    answer_prefix: str

    def render(self, context: str) -> str:
        return f"{self.instruction}\n\n{context}\n\n{self.question} {self.answer_prefix}"

    def meta(self, context: str) -> dict[str, str]:
        return {
            "instruction": self.instruction,
            "context": context,
            "question": self.question,
            "answer_prefix": self.answer_prefix,
        }


@dataclass
class Draft:
    """What a task makes for one sample; :meth:`Task.generate` adds the id and the common meta."""

    prompt: str
    answer: str | list[str]
    tokens: int
    meta: dict[str, Any]


class Task(ABC):
    """A long-context task. Subclasses set the class attributes and implement :meth:`_sample`;
    :meth:`generate` does the shared checks, seeding and bookkeeping."""

    name: ClassVar[str]
    description: ClassVar[str]
    max_new_tokens: ClassVar[int]
    """Generation budget that covers the answer with the default options."""
    options: ClassVar[dict[str, Any]] = {}
    """Accepted ``**opts`` of :meth:`generate` and their defaults."""

    def generate(self, n: int, length: int, tokenizer: Tokenizer, seed: int = 0, **opts: Any) -> list[Sample]:
        """``n`` samples whose prompts are at most ``length`` tokens of ``tokenizer`` (and at most a few
        fewer). The same arguments always give the same samples."""
        if n <= 0:
            raise ValueError(f"n={n}: ask for at least one sample (n >= 1)")
        unknown = sorted(set(opts) - set(self.options))
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for task {self.name!r}; valid options: {sorted(self.options) or 'none'}"
            )
        merged = {**self.options, **opts}
        self._check(merged)
        # The task name is mixed in so that tasks sharing a seed do not plant the same numbers.
        rng = random.Random(f"{self.name}:{seed}")
        count = TokenCounter(tokenizer)
        samples = []
        for i in range(n):
            d = self._sample(i, rng, length, count, **merged)
            meta = {"length": length, "seed": seed, "tokens": d.tokens, **d.meta}
            samples.append(Sample(self.name, f"{self.name}-{seed}-{i}", d.prompt, d.answer, meta))
        return samples

    def new_tokens(self, sample: Sample) -> int:
        """Tokens to generate for ``sample``: :attr:`max_new_tokens`, unless the task sizes its outputs per sample."""
        return self.max_new_tokens

    def score(self, sample: Sample, output: str) -> float:
        """Fraction of the gold answers that appear in ``output`` (case-insensitive), as RULER scores."""
        gold = [sample.answer] if isinstance(sample.answer, str) else sample.answer
        text = output.lower()
        return sum(g.lower() in text for g in gold) / len(gold)

    def _check(self, opts: dict[str, Any]) -> None:
        """Reject bad option values before any work; the default accepts everything."""

    def _require_positive(self, opts: dict[str, Any], *names: str) -> None:
        for name in names:
            value = opts[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                example = f"{name}={self.options[name]}"
                raise ValueError(f"{name}={value!r} for task {self.name!r}: give a positive integer, e.g. {example}")

    @abstractmethod
    def _sample(self, i: int, rng: random.Random, length: int, count: TokenCounter, **opts: Any) -> Draft:
        """Make sample number ``i``, drawing all randomness from ``rng``."""


_TASKS: dict[str, Task] = {}

T = TypeVar("T", bound=type[Task])


def register(cls: T) -> T:
    """Class decorator: make a task available to :func:`get_task` under ``cls.name``."""
    if cls.name in _TASKS:
        raise ValueError(f"task name {cls.name!r} is already registered")
    _TASKS[cls.name] = cls()
    return cls


def get_task(name: str) -> Task:
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(list_tasks())}")
    return _TASKS[name]


def list_tasks() -> list[str]:
    return sorted(_TASKS)
