"""The name transformers gives the cache argument of ``model(...)`` and ``model.generate(...)``.

transformers 5.24 renamed ``past_key_values=`` to ``cache=`` and warns on the old name (removal is
announced); releases before it know only the old name. kvslim supports both sides of the rename
(see pyproject), so its own calls pass the cache through :func:`cache_arg`: no deprecation warning
on new releases, no TypeError on old ones.
"""
from __future__ import annotations

from typing import Any

import transformers

_MAJOR_MINOR = tuple(int(part) for part in transformers.__version__.split(".")[:2])
#: ``cache`` from transformers 5.24 on (dev builds included), ``past_key_values`` before
CACHE_ARG = "cache" if _MAJOR_MINOR >= (5, 24) else "past_key_values"


def cache_arg(cache: Any) -> dict[str, Any]:
    """``{name: cache}`` for a forward or generate call: ``model(ids, **cache_arg(cache), use_cache=True)``."""
    return {CACHE_ARG: cache}
