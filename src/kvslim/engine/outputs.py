"""What a finished request returns: its completions and what its KV cache cost."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "length", "stop" (EOS or a stop string) or "abort"


@dataclass
class RequestOutput:
    """One request's completions (``n`` of them) and per-request stats.

    ``stats``: prompt_tokens, cached_prompt_tokens (from the prefix cache), completion_tokens,
    ttft_s, latency_s, tpot_s (mean time per output token after the first), itl_p50_s and itl_p99_s (percentiles
    of the times between consecutive tokens: a step stalled by another prompt's prefill shows in p99), preemptions,
    peak_kv_blocks, peak_kv_bytes (device memory: blocks and ring row), peak_kv_host_bytes (host memory:
    KCache's offloaded values) and full_kv_bytes (what an uncompressed cache would have needed).
    """

    request_id: str
    prompt_token_ids: list[int]
    completions: list[Completion]
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.completions[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.completions[0].token_ids
