"""The decode step's fused kernels (norms, RoPE, SwiGLU) against their PyTorch references, and the stacked
projection weights against the separate linears."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from interpreted import run_interpreted
from kvslim.engine.fused_weights import stack_linears
from kvslim.kernels import fused_ops_ref as ref


def check_kernels(dtype: torch.dtype) -> None:
    from kvslim.kernels import fused_ops

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device, dtype)  # noqa: E731
    x, delta, weight = rand(5, 96), rand(5, 96), rand(96)  # a width that is not a power of two (Qwen2.5-0.5B: 896)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    got_sum, got_norm = fused_ops.add_rms_norm(x, delta, weight, 1e-6)
    want_sum, want_norm = ref.add_rms_norm(x, delta, weight, 1e-6)
    # one rounding of the same sum: exact on a GPU (Triton's interpreter may round bf16 differently)
    torch.testing.assert_close(got_sum, want_sum, **(dict(atol=0, rtol=0) if device == "cuda" else tol))
    torch.testing.assert_close(got_norm, want_norm, **tol)
    torch.testing.assert_close(fused_ops.rms_norm(x, weight, 1e-6), ref.rms_norm(x, weight, 1e-6), **tol)

    qkv = rand(3, 4 + 2 + 2, 16)  # rows of a stacked q/k/v output: q is a strided view into it
    cos, sin = rand(3, 16), rand(3, 16)
    q = qkv[:, :4]
    want = ref.rotate(q.clone(), cos, sin)
    got = fused_ops.rotate_(q, cos, sin)
    assert got.data_ptr() == qkv.data_ptr()  # in place, the rest of the buffer untouched
    torch.testing.assert_close(got, want, **tol)

    gate_up = rand(3, 2 * 1500)  # more than one program per row
    torch.testing.assert_close(fused_ops.silu_mul(gate_up), ref.silu_mul(gate_up), **tol)


def test_kernels_match_references() -> None:
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        for dtype in (torch.bfloat16, torch.float32):
            check_kernels(dtype)
        return
    run_interpreted(__file__, timeout_s=300)


def test_stacked_linears_compute_the_same_and_share_storage() -> None:
    gen = torch.Generator().manual_seed(0)
    linears = [nn.Linear(8, n, bias=True) for n in (6, 2, 2)]
    x = torch.randn(3, 8, generator=gen)
    want = torch.cat([m(x) for m in linears], -1)
    weight, bias = stack_linears(linears)
    torch.testing.assert_close(F.linear(x, weight, bias), want)
    assert linears[1].weight.data_ptr() == weight[6:].data_ptr()  # the modules now read rows of the stack
    torch.testing.assert_close(torch.cat([m(x) for m in linears], -1), want)
    again, _ = stack_linears(linears)  # a second engine over the same model: no new copy
    assert again.data_ptr() == weight.data_ptr()


def test_stacked_linears_without_bias() -> None:
    linears = [nn.Linear(4, 4, bias=False) for _ in range(2)]
    weight, bias = stack_linears(linears)
    assert bias is None and weight.shape == (8, 4)


if __name__ == "__main__":
    for dtype in (torch.bfloat16, torch.float32):
        check_kernels(dtype)
