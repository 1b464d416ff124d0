"""The Triton decode kernel over packed codes agrees with dequantize-then-attend.

On a GPU the tests run in process. On a CPU they need Triton's interpreter, which must be switched on
before Triton is first imported (the conftest's imports load it), so ``test_under_the_interpreter`` reruns
this file in a child process with ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from functools import partial

import pytest
import torch

pytest.importorskip("triton")

from kvslim.cache.quantized import ChannelGroups, Float8, QuantizedSegment, TokenGroups  # noqa: E402
from kvslim.cache.segments import merge_partials, partial_attention  # noqa: E402
from kvslim.kernels.quant_decode import (plan_decode, quant_decode, quant_decode_partial,  # noqa: E402
                                         quant_decode_with_tail)
from kvslim.kernels.quant_decode_ref import quant_decode_ref  # noqa: E402

IN_PROCESS = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
in_process = pytest.mark.skipif(not IN_PROCESS, reason="CPU: runs in a child process (test_under_the_interpreter)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, HKV, GROUP, D = 2, 2, 2, 64


def build(keys_kivi: bool, bits: int, dtype: torch.dtype, run: int = 32, seed: int = 0) -> QuantizedSegment:
    """Ragged (sequence, head) lengths, all whole KIVI runs of ``run`` tokens; one outlier key channel."""
    gen = torch.Generator().manual_seed(seed)
    tokens = 6 * run
    keys = torch.randn(B, HKV, tokens, D, generator=gen)
    keys[..., 5] += 6.0
    values = torch.randn(B, HKV, tokens, D, generator=gen)
    keep = torch.arange(tokens) < (torch.tensor([[6, 2], [4, 1]]) * run).unsqueeze(-1)
    encode_keys = partial(ChannelGroups.encode if keys_kivi else TokenGroups.encode, bits=bits,
                          group=run if keys_kivi else 16)
    return QuantizedSegment.from_padded(keys.to(DEVICE, dtype), values.to(DEVICE, dtype), keep.to(DEVICE),
                                        encode_keys, partial(TokenGroups.encode, bits=bits, group=16))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


@in_process
@pytest.mark.parametrize(("bits", "keys_kivi", "dtype"), [(2, True, torch.bfloat16), (4, False, torch.bfloat16),
                                                          (4, True, torch.float16), (2, False, torch.float16)])
def test_matches_reference(bits: int, keys_kivi: bool, dtype: torch.dtype) -> None:
    seg = build(keys_kivi, bits, dtype)
    query = torch.randn(B, HKV * GROUP, D, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    ref = quant_decode_ref(query, seg, D**-0.5)
    for splits in (1, 3):
        out = quant_decode(query, seg, D**-0.5, plan_decode(seg, HKV * GROUP, splits=splits))
        assert out.dtype == dtype and out.shape == query.shape
        assert rel_err(out, ref) < 1e-2


@in_process
@pytest.mark.parametrize("run", [16, 128, 24])
def test_kivi_runs_longer_or_shorter_than_a_tile(run: int) -> None:
    """Tiles of 64 tokens over runs of 16 (4 runs a tile), 128 (half a run a tile) and 24 (not a power of
    two, so each token's run is looked up)."""
    seg = build(True, 2, torch.bfloat16, run=run)
    plan = plan_decode(seg, HKV * GROUP, splits=2)
    assert plan.shared_runs == (0 if run == 24 else max(1, 64 // run))
    query = torch.randn(B, HKV * GROUP, D, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.bfloat16)
    assert rel_err(quant_decode(query, seg, D**-0.5, plan), quant_decode_ref(query, seg, D**-0.5)) < 1e-2


@in_process
@pytest.mark.parametrize("bits", [2, 8])
def test_after_eviction_kivi_runs_of_any_size(bits: int) -> None:
    """Evicted KIVI segments hold partial runs: the kernel follows each token's run index."""
    seg = build(True, bits, torch.bfloat16)
    keep = torch.rand(B, HKV, seg.longest, generator=torch.Generator().manual_seed(2)) < 0.6
    seg = seg.select(keep.to(DEVICE))
    assert seg.keys.sizes is not None
    query = torch.randn(B, HKV * GROUP, D, generator=torch.Generator().manual_seed(3)).to(DEVICE, torch.bfloat16)
    plan = plan_decode(seg, HKV * GROUP, splits=2)
    assert plan.shared_runs == 0
    assert rel_err(quant_decode(query, seg, D**-0.5, plan), quant_decode_ref(query, seg, D**-0.5)) < 1e-2


@in_process
def test_empty_head_gives_zeros_and_fp8_is_refused() -> None:
    seg = build(True, 4, torch.bfloat16)
    keep = torch.ones(B, HKV, seg.longest, dtype=torch.bool, device=DEVICE)
    keep[1, 1] = False
    seg = seg.select(keep)
    query = torch.randn(B, HKV * GROUP, D).to(DEVICE, torch.bfloat16)
    out = quant_decode(query, seg, D**-0.5)
    assert torch.equal(out[1, 2:], torch.zeros_like(out[1, 2:]))
    assert rel_err(out, quant_decode_ref(query, seg, D**-0.5)) < 1e-2
    fp8 = QuantizedSegment.from_padded(torch.randn(1, 1, 8, 32), torch.randn(1, 1, 8, 32),
                                       torch.ones(1, 1, 8, dtype=torch.bool), Float8.encode, Float8.encode)
    with pytest.raises(ValueError, match="Float8"):
        quant_decode(torch.randn(1, 1, 32, dtype=torch.bfloat16), fp8, 0.1)
    with pytest.raises(ValueError, match="at least 64"):
        plan_decode(seg, HKV * GROUP, block_t=16)


@in_process
@pytest.mark.parametrize("splits", [1, 3])
def test_partial_matches_attention_over_the_dense_copy(splits: int) -> None:
    """Output and log-sum-exp, what the HF cache merges with its full-precision tail; a head with no token
    has lse -inf and output 0."""
    seg = build(True, 4, torch.bfloat16)
    seg = seg.select(torch.arange(seg.longest, device=DEVICE) < torch.tensor([[6, 0], [4, 1]], device=DEVICE)
                     .mul(32).unsqueeze(-1))
    query = torch.randn(B, HKV * GROUP, D, generator=torch.Generator().manual_seed(2)).to(DEVICE, torch.bfloat16)
    keys, values, valid = seg.dense()
    ref_out, ref_lse = partial_attention(query[:, :, None], keys, values, valid[:, :, None], D**-0.5)
    out, lse = quant_decode_partial(query, seg, D**-0.5, plan_decode(seg, HKV * GROUP, splits=splits))
    assert rel_err(out, ref_out[:, :, 0]) < 1e-2
    real = torch.isfinite(ref_lse[:, :, 0])
    assert not real.all() and torch.equal(torch.isfinite(lse), real)
    torch.testing.assert_close(lse[real], ref_lse[:, :, 0][real], atol=2e-2, rtol=1e-3)
    assert (out[~real] == 0).all()


@in_process
@pytest.mark.parametrize("masked", [False, True])
def test_with_tail_matches_merging_the_two_partials(masked: bool) -> None:
    """One normalization over the kernel's splits and a full-precision tail is the attention over both: the merge of
    the packed partial (an empty head included) with the tail's partial; ``masked``: a static tail's unheld columns
    are ignored, whatever they hold."""
    seg = build(True, 4, torch.bfloat16)
    seg = seg.select(torch.arange(seg.longest, device=DEVICE) < torch.tensor([[6, 0], [4, 1]], device=DEVICE)
                     .mul(32).unsqueeze(-1))
    gen = torch.Generator().manual_seed(3)
    query = torch.randn(B, HKV * GROUP, D, generator=gen).to(DEVICE, torch.bfloat16)
    tail_keys, tail_values = (torch.randn(B, HKV, 9, D, generator=gen).to(DEVICE, torch.bfloat16) for _ in range(2))
    valid = torch.arange(9, device=DEVICE) < torch.tensor([[9, 3], [5, 1]], device=DEVICE).unsqueeze(-1)
    if masked:
        tail_keys = tail_keys.masked_fill(~valid[..., None], 50.0)  # stale rows that would dominate if read
    held = valid if masked else torch.ones_like(valid)
    plan = plan_decode(seg, HKV * GROUP, splits=3)
    out = quant_decode_with_tail(query, seg, D**-0.5, plan, tail_keys, tail_values, valid if masked else None)
    packed = quant_decode_partial(query, seg, D**-0.5, plan)
    tail = partial_attention(query[:, :, None], tail_keys, tail_values, held[:, :, None], D**-0.5)
    expected, _ = merge_partials([(packed[0][:, :, None], packed[1][:, :, None]), tail])
    torch.testing.assert_close(out, expected[:, :, 0], atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(IN_PROCESS, reason="the kernel tests above run in this process")
def test_under_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "skipped" not in done.stdout.splitlines()[-1]
