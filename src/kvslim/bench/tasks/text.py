"""Real English prose that needs no download: the Python reference documentation that CPython ships
as ``pydoc_data.topics`` (the text behind ``help("if")``, ``help("assignment")`` and so on).

The haystack tasks hide facts in it and ``perplexity`` measures on it. Technical prose is still prose:
a model must read it as text, unlike repeated synthetic filler that a compressed cache can fake.
Only sentences that read as prose are kept (no grammar rules, code, tables or markup), without long
digit runs so that planted numbers are the only ones in a haystack, and without duplicates so that
a chunk never repeats itself.
"""
from __future__ import annotations

import platform
import re
from functools import cache

SOURCE = f"pydoc_data.topics (Python {platform.python_version()} reference documentation)"
"""Where the text comes from; it varies a little between Python versions, so the version is part of it."""

_UNDERLINE = re.compile(r"^\s*([*=\-^~])\1{2,}\s*$")  # rst heading rules
_EMPHASIS = re.compile(r"\*{1,2}([^*\s][^*]*?)\*{1,2}")
_LABEL = re.compile(r"^(Note|Warning|See also|CPython implementation detail):\s*")
_SENTENCE_END = re.compile(r"(?<!e\.g\.)(?<!i\.e\.)(?<=[.!?])\s+(?=[A-Z“\"(])")
_NOT_PROSE = re.compile(r"[=\[\]{}<>#\\|@~^$%*]|::|\.\.\.|\d{4,}")


@cache
def sentences() -> tuple[str, ...]:
    """The cleaned corpus as sentences in document order (topics sorted by name)."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some distributions strip it
        raise RuntimeError("pydoc_data.topics is missing from this Python; install the full standard library") from e
    seen: set[str] = set()
    out = []
    for name in sorted(topics):
        for paragraph in re.split(r"\n\s*\n", topics[name]):
            for s in _SENTENCE_END.split(_paragraph_text(paragraph)):
                if _is_prose(s) and s not in seen:
                    seen.add(s)
                    out.append(s)
    return tuple(out)


def _paragraph_text(paragraph: str) -> str:
    """One line of text: heading lines, bullet marks, emphasis and labels removed, hyphen breaks joined."""
    lines = paragraph.splitlines()
    kept = [
        line.strip().removeprefix("* ")
        for i, line in enumerate(lines)
        if not _UNDERLINE.match(line) and not (i + 1 < len(lines) and _UNDERLINE.match(lines[i + 1]))
    ]
    text = re.sub(r"(?<=[a-z])- (?=[a-z])", "-", " ".join(kept))
    return _LABEL.sub("", _EMPHASIS.sub(r"\1", " ".join(text.split())))


def _is_prose(s: str) -> bool:
    words = s.split()
    return (
        len(words) >= 4
        and s[0].isupper()
        and s[-1] in ".?!"
        and not _NOT_PROSE.search(s)
        and sum(any(c.isalpha() for c in w) for w in words) >= 0.9 * len(words)
    )
