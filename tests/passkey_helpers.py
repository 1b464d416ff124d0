"""Pass-key retrieval through ``kvslim.generate``, shared by the real-model tests."""
from __future__ import annotations

from typing import Any

import kvslim
from kvslim.bench.tasks import get_task


def retrieved(smollm2: tuple[Any, Any], samples: list, policy: str, **params: Any) -> list[bool]:
    """Whether each sample's pass key appears in the answer (two batches of five prompts of different lengths)."""
    model, tokenizer = smollm2
    task, hits = get_task("passkey"), []
    for start in range(0, len(samples), 5):
        batch = samples[start : start + 5]
        out = kvslim.generate(model, tokenizer, [s.prompt for s in batch], policy, max_new_tokens=12, **params)
        hits += [task.score(s, g.text) == 1.0 for s, g in zip(batch, out)]
    return hits


def assert_keeps_pass_keys(hits: list[bool], label: str, need: int = 9) -> None:
    """``hits`` are over prompts the full cache answers (the ``passkeys`` fixture)."""
    assert sum(hits) >= need, f"{label} found {sum(hits)}/{len(hits)} pass keys that the full cache finds"
