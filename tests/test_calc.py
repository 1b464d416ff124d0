"""Exact byte arithmetic of the KV-memory calculator, checked against numbers that can be worked out by hand."""
from __future__ import annotations

import json

import pytest
import torch

import kvslim

from kvslim.calc import CalcResult, calculate, format_bytes, format_calc
from kvslim.models import load_config
from kvslim.shape import KVShape

GIB = 1024**3


def preset_shape(name: str) -> KVShape:
    return KVShape.from_config(load_config(name))


class FixedPolicy:
    """Stand-in for a compression policy: holds a fixed number of bytes and records how it was asked."""

    name = "fixed"

    def __init__(self, held: object) -> None:
        self.held = held
        self.calls: list[tuple[KVShape, int]] = []

    def expected_bytes(self, shape: KVShape, n_tokens: int) -> object:
        self.calls.append((shape, n_tokens))
        return self.held


def test_llama_8b_bf16_128k_is_16_gib() -> None:
    result = calculate(preset_shape("llama-3.1-8b"), context=131072, batch=1)
    # 2 (K and V) x 8 KV heads x 128 dims x 2 bytes = 4096 B per layer; x 32 layers = 131072 B per token.
    assert result.bytes_per_token_per_layer == 4096
    assert result.bytes_per_token == 131072
    assert result.full_bytes == 16 * GIB
    assert result.attention == "GQA"
    assert result.dtype == "bfloat16"


@pytest.mark.parametrize(
    ("name", "bytes_per_token"),
    [
        ("llama-3.1-70b", 2 * 80 * 8 * 128 * 2),
        ("qwen2.5-7b", 2 * 28 * 4 * 128 * 2),
        ("mistral-7b", 2 * 32 * 8 * 128 * 2),
        ("smollm2-135m", 2 * 30 * 3 * 64 * 2),
    ],
)
def test_preset_bytes_per_token(name: str, bytes_per_token: int) -> None:
    assert calculate(preset_shape(name), context=1, batch=1).bytes_per_token == bytes_per_token


def test_total_scales_with_context_batch_and_dtype() -> None:
    shape = KVShape(num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16, dtype=torch.float32)
    result = calculate(shape, context=1000, batch=3)
    assert result.bytes_per_token == 2 * 2 * 4 * 16 * 4
    assert result.full_bytes == 1024 * 1000 * 3
    half = KVShape(2, 4, 4, 16, torch.float16)
    assert calculate(half, context=1000, batch=3).full_bytes * 2 == result.full_bytes


@pytest.mark.parametrize(("kv_heads", "kind"), [(32, "MHA"), (8, "GQA"), (1, "MQA")])
def test_attention_kind(kv_heads: int, kind: str) -> None:
    result = calculate(KVShape(32, 32, kv_heads, 128), context=8, batch=1)
    assert result.attention == kind
    assert result.bytes_per_token == 2 * 32 * kv_heads * 128 * 2


def test_policy_bytes_are_per_sequence_times_batch() -> None:
    shape = preset_shape("llama-3.1-8b")
    policy = FixedPolicy(GIB)
    result = calculate(shape, context=131072, batch=4, policy=policy)
    assert policy.calls == [(shape, 131072)]
    assert result.policy == "fixed"
    assert result.policy_bytes == 4 * GIB
    assert result.policy_ratio == pytest.approx(1 / 16)


def test_no_policy_leaves_policy_fields_empty() -> None:
    result = calculate(preset_shape("mistral-7b"), context=4096, batch=2)
    assert (result.policy, result.policy_bytes, result.policy_ratio) == (None, None, None)


def test_policy_name_falls_back_to_class_name() -> None:
    class Unnamed:
        def expected_bytes(self, shape: KVShape, n_tokens: int) -> int:
            return 0

    assert calculate(preset_shape("mistral-7b"), 16, 1, Unnamed()).policy == "Unnamed"


@pytest.mark.parametrize("held", [1.5, -1, "100", True])
def test_policy_must_return_a_byte_count(held: object) -> None:
    with pytest.raises(TypeError, match="expected_bytes"):
        calculate(preset_shape("mistral-7b"), 16, 1, FixedPolicy(held))


@pytest.mark.parametrize("argument", ["context", "batch"])
@pytest.mark.parametrize("bad", [0, -5, 2.0, True, "4096", None])
def test_rejects_non_positive_ints(argument: str, bad: object) -> None:
    kwargs = {"context": 4096, "batch": 1, argument: bad}
    with pytest.raises(ValueError, match=rf"{argument} must be a positive integer"):
        calculate(preset_shape("llama-3.1-8b"), **kwargs)


def test_to_dict_is_json_safe_and_complete() -> None:
    result = calculate(preset_shape("qwen2.5-7b"), 32768, 2, FixedPolicy(1000))
    data = json.loads(json.dumps(result.to_dict()))
    assert data["full_bytes"] == 57344 * 32768 * 2
    assert data["policy_bytes"] == 2000
    assert data["dtype"] == "bfloat16"
    assert CalcResult(**data) == result


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (1536, "1.50 KiB"),
        (5 * 1024**2, "5.00 MiB"),
        (16 * GIB, "16.00 GiB"),
    ],
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


def test_format_calc_shows_human_and_exact_sizes() -> None:
    text = format_calc(calculate(preset_shape("llama-3.1-8b"), 131072, 1, FixedPolicy(GIB)))
    assert "16.00 GiB (17,179,869,184 B)" in text
    assert "128.00 KiB (131,072 B)" in text
    assert "GQA" in text
    assert "with fixed" in text and "6.25% of full" in text


def test_format_calc_without_policy_has_no_policy_row() -> None:
    text = format_calc(calculate(preset_shape("llama-3.1-8b"), 4096, 1))
    assert "with " not in text
    assert len(text.splitlines()) == 5


def test_sliding_window_layers_hold_at_most_the_window(capsys):
    """Mistral-7B's 4096-token window: every layer holds at most 4095 tokens between steps (as the caches do)."""
    from kvslim.cli import main

    assert main(["calc", "--model", "mistral-7b", "--context", "32768", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["full_bytes"] == 4095 * 131072 and (out["sliding_layers"], out["window"]) == (32, 4096)
    assert main(["calc", "--model", "mistral-7b", "--context", "1000", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["full_bytes"] == 1000 * 131072


def test_alternating_windows_count_each_layer():
    windows = [8, None, 8, None]
    result = calculate(KVShape(4, 4, 2, 16, torch.float16), 100, 2, kvslim.policy("snapkv", keep=0.5), windows)
    per_layer = 2 * 2 * 16 * 2
    assert result.full_bytes == 2 * per_layer * (7 + 100 + 7 + 100)
    assert result.policy_bytes < result.full_bytes
