"""Shared fixtures: tiny random models of real architectures (MHA, GQA, MQA) with fixed seeds."""
from __future__ import annotations

import pytest
import torch

from kvslim.models import tiny_model

ARCHS = [("llama", "gqa"), ("llama", "mha"), ("qwen2", "gqa"), ("mistral", "gqa"), ("llama", "mqa")]


@pytest.fixture(params=ARCHS, ids=[f"{a}-{b}" for a, b in ARCHS])
def model(request):
    arch, attention = request.param
    return tiny_model(arch, attention, seed=0)


@pytest.fixture
def llama():
    return tiny_model("llama", "gqa", seed=0)


@pytest.fixture
def prompt():
    return torch.randint(1, 256, (1, 96), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct and its tokenizer (loaded once per test session)."""
    from kvslim.models import load_smollm2

    return load_smollm2()


@pytest.fixture(scope="session")
def passkeys(smollm2):
    """Ten pass-key prompts of 2k tokens with the real tokenizer."""
    from kvslim.bench.tasks import get_task

    return get_task("passkey").generate(10, 2048, smollm2[1], seed=0)


@pytest.fixture(scope="session")
def full_passkey_hits(smollm2, passkeys):
    """Which pass keys the full cache retrieves: the reference every method is compared with."""
    from passkey_helpers import retrieved

    return retrieved(smollm2, passkeys, "full")
