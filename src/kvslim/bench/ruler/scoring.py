"""RULER's scores: ``string_match_all`` (the fraction of expected strings found in the output, partial
credit for multi-answer tasks) and ``string_match_part`` (1 if any is found, for QA), case-insensitive,
on the output after RULER's clean-up of control characters."""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(output: str) -> str:
    """RULER's ``postprocess_pred``: control characters become newlines, then strip."""
    return _CONTROL.sub("\n", output).strip()


def string_match_all(output: str, refs: Sequence[str]) -> float:
    text = postprocess(output).lower()
    return sum(r.lower() in text for r in refs) / len(refs)


def string_match_part(output: str, refs: Sequence[str]) -> float:
    text = postprocess(output).lower()
    return float(max(r.lower() in text for r in refs))


METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "string_match_all": string_match_all, "string_match_part": string_match_part,
}
