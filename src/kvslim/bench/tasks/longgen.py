"""Long generation whose every step depends on what the model itself wrote long before: repeat a list, in cycles.

The prompt holds a numbered list of distinct keys ("1. swift-otter", ...), then asks for it again and again,
numbering on; the answer prefix starts the first repeat. The output is most of the sample's ``length`` (the
context reached at the end, prompt included), ``cycles`` repeats of the list: after the first repeat each line
copies the line one list length back *in the model's own output*, so a cache that dropped those tokens cannot
go on. A budget below one list's tokens cannot hold the list; R-KV, decode-time SnapKV and the rest are judged
by what they keep of it.

Scoring recomputes each line's expected key from the text as the model wrote it, not from the prompt's list:
line ``j`` is right when its key is the one on line ``j - K`` (``K`` lines per list) and none of the ``K - 1``
lines between has it, so one slip costs a line or two rather than every line after it, and repeating one key
over and over scores nothing. The score is the share of the lines the output budget holds (``expected_lines``)
that are right, so stopping early counts as failing the lines not written.
"""
from __future__ import annotations

import random
import re
from typing import Any

from . import vocab
from .base import Draft, Sample, Task, Template, register
from .fit import TokenCounter

LEAD = 2
"""Lines of the first repeat written in the answer prefix, so the model sees how the list goes on."""
_LINE = re.compile(r"^\s*(\d+)\.\s*(\S+)")


def listing(words: list[str], start: int) -> str:
    """Numbered lines ``start. word``, one per word."""
    return "\n".join(f"{start + i}. {w}" for i, w in enumerate(words))


def keys_of(text: str) -> list[str]:
    """The key on each numbered line of ``text``, in order. Other lines are skipped: models head each repeat as
    the prompt does ("The list again, from the top:"), and a line of prose writes no key, right or wrong."""
    return [match.group(2) for match in map(_LINE.match, text.split("\n")) if match is not None]


class ListTemplate(Template):
    """The list, the question, and the answer prefix (the first lines of the repeat) on lines of their own."""

    def render_plain(self, context: str) -> str:
        return f"{self.instruction}\n\n{context}\n\n{self.question}\n{self.answer_prefix}"


def _template(words: list[str], lines: int) -> ListTemplate:
    return ListTemplate(
        "Write the list below again, then again and again, in the same order; go on numbering the lines. "
        "Write only the list.",
        "The list again, from the top:",
        listing(words[:LEAD], lines + 1) + f"\n{lines + LEAD + 1}.",
    )


def _expected_lines(words: list[str], budget: int, count: TokenCounter) -> int:
    """Lines of the perfect continuation (after the answer prefix) that fit in ``budget`` tokens."""
    n = len(words)
    first = n + LEAD + 1
    lines = [f" {words[LEAD % n]}"] + [f"{j}. {words[(j - 1) % n]}" for j in range(first + 1, first + budget)]
    low, high = 0, len(lines)  # the most lines whose text fits
    while low < high:
        mid = (low + high + 1) // 2
        if count("\n".join(lines[:mid])) <= budget:
            low = mid
        else:
            high = mid - 1
    return max(1, low)


@register
class LongGeneration(Task):
    name = "longgen"
    description = "Repeat a numbered list in cycles for thousands of tokens; each line is checked against the " \
                  "model's own line one list back."
    max_new_tokens = 4096
    """Per sample it is ``meta["max_new_tokens"]`` (see :meth:`new_tokens`): ``length`` minus the prompt."""
    options = {"cycles": 3}
    """``cycles``: repeats of the list the output holds (so a list takes ``length / (cycles + 1)`` tokens)."""

    def _check(self, opts: dict[str, Any]) -> None:
        self._require_positive(opts, "cycles")

    def new_tokens(self, sample: Sample) -> int:
        return sample.meta["max_new_tokens"]

    def _sample(self, i: int, rng: random.Random, length: int, count: TokenCounter, **opts: Any) -> Draft:
        cycles = opts["cycles"]
        pool = vocab.keys(rng, vocab.KEY_COUNT)
        per_line = count(listing(pool[:16], 101)) / 16
        fixed = count(_template(pool, 100).render_plain(""))
        lines = min(len(pool), int((length - fixed) / ((cycles + 1) * per_line)))
        if lines <= LEAD:
            raise ValueError(f"length={length} is too short for task {self.name!r} with cycles={cycles}: use a length of "
                             f"at least {int(fixed + (cycles + 1) * (LEAD + 1) * per_line) + 1} tokens")
        words = pool[:lines]
        template = _template(words, lines)
        prompt = template.render_plain(listing(words, 1))
        tokens = count(prompt)
        budget = length - tokens
        if budget < 1:
            raise ValueError(f"length={length} leaves no output tokens after a {tokens}-token prompt: raise length")
        meta = {"lines": lines, "cycles": cycles, "max_new_tokens": budget,
                "expected_lines": _expected_lines(words, budget, count)}
        return Draft(prompt, words, tokens, {**meta, **template.meta(listing(words, 1))})

    def score(self, sample: Sample, output: str) -> float:
        """Share of ``expected_lines`` whose key repeats the model's own key one list back (see the module)."""
        m = sample.meta
        k = m["lines"]
        written = keys_of(m["context"] + "\n" + m["answer_prefix"] + output)
        first = k + LEAD  # the first line the model wrote itself
        right = sum(written[j] == written[j - k] and written[j] not in written[j - k + 1 : j]
                    for j in range(first, len(written)))
        return min(1.0, right / m["expected_lines"])
