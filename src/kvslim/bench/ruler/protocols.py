"""The two ways a compressed cache can meet the question, and how a sample is fed under each.

*Query-aware*: the question is part of the prompt that is compressed, so a method that scores by the last
tokens' attention (SnapKV's window) sees it. *Query-agnostic* (kvpress's pipeline, KVzip's setting, and
what prefix caching and multi-turn chat need): the context is prefilled and compressed alone, then the
question is appended uncompressed (:meth:`kvslim.cache.Cache.appended`) and answered from the compressed
cache. Both feed the same token ids.
"""
from __future__ import annotations

QUERY_AWARE = "query-aware"
QUERY_AGNOSTIC = "query-agnostic"
PROTOCOLS = (QUERY_AWARE, QUERY_AGNOSTIC)

DESCRIPTIONS = {
    QUERY_AWARE: "context and question prefilled together, then compressed (the question can shape and lose "
                 "what is kept)",
    QUERY_AGNOSTIC: "context prefilled and compressed alone, then the question appended uncompressed and "
                    "answered from the compressed cache (kvpress's pipeline)",
}


def parse_protocols(text: str) -> list[str]:
    """``"query-aware,query-agnostic"`` (or ``both``) -> the list, checked."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    if names == ["both"]:
        return list(PROTOCOLS)
    bad = [p for p in names if p not in PROTOCOLS]
    if bad or not names:
        raise ValueError(f"unknown protocol(s) {bad or text!r}; valid: {', '.join(PROTOCOLS)} (or both)")
    return list(dict.fromkeys(names))


def feed(context_ids: list[int], question_ids: list[int], protocol: str) -> tuple[list[int], list[int] | None]:
    """(prompt ids, ids appended uncompressed after it, or None) for ``generate_ids``."""
    if protocol == QUERY_AWARE:
        return context_ids + question_ids, None
    return context_ids, question_ids
