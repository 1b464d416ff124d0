"""Fit a prompt to a token budget without re-tokenizing it in a loop.

Filler comes as a stream of pieces (sentences, words). Each distinct piece is tokenized once and
its count cached; a prompt is assembled from the cheapest prefix of the stream that fits, then
tokenized whole once to correct for merges across piece boundaries. A few such rounds land within
:data:`TOLERANCE` tokens of the target (more only where one word costs more), never above it.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

TOLERANCE = 4
"""A prompt this many tokens under the target is close enough."""
_ROUNDS = 8


class Tokenizer(Protocol):
    """The one method used from a Hugging Face tokenizer (or a test stand-in)."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> Sequence[object]: ...


class TokenCounter:
    """Token counts without special tokens; pieces are counted as they appear after a space and cached,
    because filler repeats."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._pieces: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def piece(self, text: str) -> int:
        if text not in self._pieces:
            self._pieces[text] = self(" " + text)
        return self._pieces[text]


def take(pieces: Iterable[str], budget: int, count: TokenCounter) -> tuple[list[str], bool]:
    """The longest prefix of ``pieces`` that costs at most ``budget`` tokens, and whether ``pieces`` ran
    out first. The first piece that does not fit is cut at a word boundary to close the gap, so long
    sentences leave no large hole."""
    out: list[str] = []
    left = budget
    for piece in pieces:
        cost = count.piece(piece)
        if cost <= left:
            out.append(piece)
            left -= cost
            continue
        words = piece.split(" ")
        lo, hi = 0, len(words) - 1  # largest k with cost(words[:k]) <= left
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count(" " + " ".join(words[:mid])) <= left:
                lo = mid
            else:
                hi = mid - 1
        if lo:
            out.append(" ".join(words[:lo]))
        return out, False
    return out, True


def fit(
    length: int,
    count: TokenCounter,
    stream: Callable[[], Iterable[str]],
    render: Callable[[list[str]], str],
) -> tuple[list[str], str, int]:
    """Choose filler from ``stream()`` (restartable) so that ``render(filler)`` has at most ``length``
    tokens and, as far as word boundaries allow, at least ``length - TOLERANCE``.
    Returns the filler, the rendered prompt and its token count."""
    fixed = count(render([]))
    if fixed > length:
        raise ValueError(
            f"length={length} is too small: the prompt without any filler already takes {fixed} tokens; "
            f"use a length of at least {fixed} (a few times more for a meaningful context)"
        )
    best: tuple[list[str], str, int] = ([], render([]), fixed)
    budget = length - fixed
    for _ in range(_ROUNDS):
        filler, dry = take(stream(), budget, count)
        prompt = render(filler)
        n = count(prompt)
        if best[2] < n <= length:
            best = (filler, prompt, n)
        if length - TOLERANCE <= n <= length:
            break
        if dry and n < length:
            raise ValueError(
                f"length={length} needs more text than the source has: it runs out at {n} tokens; "
                f"use length <= {n}"
            )
        budget = max(0, budget + length - n)
    return best
