"""Paged decode with a block table per KV head (:func:`kvslim.engine.head_kv.head_decode`): the PyTorch reference and
the Triton kernel, each (sequence, KV head) read as a one-head sequence, against dense attention over each head's own
blocks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvslim.engine.head_kv import head_decode
from kvslim.kernels.paged_attention_ref import paged_decode_ref
from interpreted import each_dtype, natively_or_interpreted

LENS = [[49, 3], [16, 64], [1, 33]]  # ragged heads: a block and one slot, a partial block, whole blocks, one slot


def _case(seed: int, dtype: torch.dtype, block_size: int = 16, dim: int = 16, q_heads: int = 4):
    """3 sequences of 2 KV heads, each head with its own shuffled blocks (-1 past its length) in a pool of one-head
    blocks."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.tensor(LENS)
    batch, kv_heads, width = len(LENS), 2, 4
    num_blocks = batch * kv_heads * width
    k_pages = torch.randn(num_blocks, block_size, 1, dim, generator=gen).to(dtype)
    v_pages = torch.randn(num_blocks, block_size, 1, dim, generator=gen).to(dtype)
    tables = torch.randperm(num_blocks, generator=gen).view(batch, kv_heads, width).int()
    tables[torch.arange(width) >= -(-lens[..., None] // block_size)] = -1
    query = torch.randn(batch, q_heads, dim, generator=gen).to(dtype)
    zeros = torch.zeros(batch, dtype=torch.int32)
    return query, k_pages, v_pages, tables, lens, zeros, zeros


def _dense(query, k_pages, v_pages, tables, lens, starts, sinks, scale):
    """Per (sequence, KV head): its first ``lens`` slots through its own table, SDPA over them."""
    out = torch.empty(query.shape, dtype=torch.float32)
    block_size, kv_heads = k_pages.shape[1], tables.shape[1]
    group = query.shape[1] // kv_heads
    for b in range(query.shape[0]):
        for h in range(kv_heads):
            at = [(int(tables[b, h, s // block_size]), s % block_size) for s in range(int(lens[b, h]))]
            keys = torch.stack([k_pages[blk, s, 0] for blk, s in at]).float()
            values = torch.stack([v_pages[blk, s, 0] for blk, s in at]).float()
            q = query[b, h * group : (h + 1) * group].float()
            out[b, h * group : (h + 1) * group] = F.scaled_dot_product_attention(q[None], keys[None], values[None],
                                                                                 scale=scale)[0]
    return out


def test_reference_reads_each_heads_own_blocks() -> None:
    case = _case(0, torch.float32)
    got = head_decode(paged_decode_ref, *case, scale=0.25)
    torch.testing.assert_close(got, _dense(*case, scale=0.25), atol=1e-5, rtol=1e-5)


def check_triton_kernel(dtype: torch.dtype) -> None:
    from kvslim.kernels.paged_attention import paged_decode

    device = "cuda" if torch.cuda.is_available() else "cpu"
    case = [t.to(device) for t in _case(1, dtype)]
    want = head_decode(paged_decode_ref, *case, scale=0.25).float()
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-3
    for splits, tile_tokens in ((None, 16), (3, 16), (2, 32)):
        kernel = lambda *args: paged_decode(*args, splits=splits, tile_tokens=tile_tokens)  # noqa: E731
        got = head_decode(kernel, *case, scale=0.25).float()
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


check_all_dtypes = each_dtype(check_triton_kernel)


def test_triton_kernel_reads_each_heads_own_blocks() -> None:
    """On a GPU in process; on a CPU in a child process under Triton's interpreter (see tests/interpreted.py)."""
    pytest.importorskip("triton")
    natively_or_interpreted(__file__, check_all_dtypes)


if __name__ == "__main__":
    check_all_dtypes()
