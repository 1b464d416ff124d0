"""On the real SmolLM2-135M-Instruct: compression keeps what matters (slow: minutes on 2 CPU cores)."""
from __future__ import annotations

import pytest

import kvslim
from kvslim.bench.tasks import get_task

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from kvslim.models import load_smollm2

    return load_smollm2()


@pytest.fixture(scope="module")
def passkeys(smollm2):
    _, tokenizer = smollm2
    return get_task("passkey").generate(10, 2048, tokenizer, seed=0)


def _retrieved(smollm2, samples, policy, **params) -> list[bool]:
    model, tokenizer = smollm2
    task, hits = get_task("passkey"), []
    for start in range(0, len(samples), 5):  # two batches of five prompts of slightly different lengths
        batch = samples[start : start + 5]
        out = kvslim.generate(model, tokenizer, [s.prompt for s in batch], policy, max_new_tokens=12, **params)
        hits += [task.score(s, g.text) == 1.0 for s, g in zip(batch, out)]
    return hits


def test_snapkv_quarter_cache_still_finds_the_pass_key(smollm2, passkeys):
    full = _retrieved(smollm2, passkeys, "full")
    snap = _retrieved(smollm2, passkeys, "snapkv", keep=0.25)
    both = sum(f and s for f, s in zip(full, snap))
    assert sum(full) >= 9, f"the full cache itself found only {sum(full)}/10 pass keys"
    assert both >= 9, f"snapkv keep=0.25 found {both} of the {sum(full)} pass keys the full cache found"
