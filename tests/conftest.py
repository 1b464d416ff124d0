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
