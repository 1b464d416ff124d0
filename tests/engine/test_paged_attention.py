"""Paged decode attention: the PyTorch reference against dense attention, the Triton kernel against the reference."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from kvslim.kernels.paged_attention_ref import paged_decode_ref
from interpreted import each_dtype, natively_or_interpreted


def _case(seed: int, dtype: torch.dtype, block_size: int = 16, dim: int = 16, q_heads: int = 4):
    """A pool with 3 sequences of ragged per-head lengths, one with a sliding window, blocks in shuffled order."""
    gen = torch.Generator().manual_seed(seed)
    batch, kv_heads, max_blocks = 3, 2, 4
    num_blocks = batch * max_blocks
    k_pages = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen).to(dtype)
    v_pages = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen).to(dtype)
    tables = torch.randperm(num_blocks, generator=gen).view(batch, max_blocks).int()
    lens = torch.tensor([[3 * block_size + 1, 2 * block_size], [5, 9], [4 * block_size, 4 * block_size]])
    starts = torch.tensor([0, 0, 2 * block_size + 3])
    sinks = torch.tensor([0, 0, 2])
    tables[2, 1] = -1  # the window passed this block: it was handed back
    query = torch.randn(batch, q_heads, dim, generator=gen).to(dtype)
    return query, k_pages, v_pages, tables, lens, starts, sinks


KEPT = 8  # ThinK's key channels of the 16: keys narrower than values


def _thin_case(seed: int, dtype: torch.dtype, kept: int = KEPT, dim: int = 16, q_heads: int = 4):
    """ThinK's pages: keys of ``kept`` channels beside whole values, the query gathered to them, and each head's newest
    slot scored with its whole key (``newest``: the rest of the channels' score). Also the same case with whole keys
    whose pruned channels are zero except at the newest slot, which attention over whole keys must equal."""
    query, k_pages, v_pages, tables, lens, starts, sinks = _case(seed, torch.float32, dim=dim, q_heads=q_heads)
    block_size, kv_heads = k_pages.shape[1], k_pages.shape[2]
    group = query.shape[1] // kv_heads
    whole = k_pages.clone()
    whole[..., kept:] = 0
    newest = torch.empty(query.shape[:2])
    for b in range(query.shape[0]):
        for h in range(kv_heads):
            slot = int(lens[b, h]) - 1
            block = int(tables[b, slot // block_size])
            whole[block, slot % block_size, h] = k_pages[block, slot % block_size, h]
            rest = query[b, h * group : (h + 1) * group, kept:] @ k_pages[block, slot % block_size, h, kept:]
            newest[b, h * group : (h + 1) * group] = rest * 0.25
    thin = (query[..., :kept].contiguous().to(dtype), k_pages[..., :kept].contiguous().to(dtype), v_pages.to(dtype),
            tables, lens, starts, sinks)
    return thin, newest, (query, whole, v_pages, tables, lens, starts, sinks)


def _dense(query, k_pages, v_pages, tables, lens, starts, sinks, scale):
    """Per (sequence, head): gather the visible slots one by one and run SDPA on them."""
    out = torch.empty(query.shape, dtype=torch.float32)
    block_size, kv_heads = k_pages.shape[1], k_pages.shape[2]
    group = query.shape[1] // kv_heads
    for b in range(query.shape[0]):
        for h in range(kv_heads):
            slots = [s for s in range(int(lens[b, h])) if s < sinks[b] or s >= starts[b]]
            blocks = [int(tables[b, s // block_size]) for s in slots]
            keys = torch.stack([k_pages[blk, s % block_size, h] for blk, s in zip(blocks, slots)]).float()
            values = torch.stack([v_pages[blk, s % block_size, h] for blk, s in zip(blocks, slots)]).float()
            q = query[b, h * group : (h + 1) * group].float()
            out[b, h * group : (h + 1) * group] = F.scaled_dot_product_attention(q[None], keys[None], values[None], scale=scale)[0]
    return out


def test_reference_matches_dense_attention_with_ragged_heads_and_window() -> None:
    case = _case(0, torch.float32)
    got = paged_decode_ref(*case, scale=0.25)
    torch.testing.assert_close(got, _dense(*case, scale=0.25), atol=1e-5, rtol=1e-5)


#: ThinK on Qwen2.5-0.5B's heads: a group of 7 query heads (padded to 16 in the kernel), 32 of 64 key channels
QWEN_SHAPED = {"kept": 32, "dim": 64, "q_heads": 14}


@pytest.mark.parametrize("shape", [{}, QWEN_SHAPED], ids=["small", "qwen-shaped"])
def test_reference_with_thin_keys_matches_dense_attention_over_whole_newest_key(shape: dict) -> None:
    thin, newest, whole = _thin_case(0, torch.float32, **shape)
    got = paged_decode_ref(*thin, scale=0.25, newest=newest)
    assert got.shape == whole[0].shape  # values' width, not the keys'
    torch.testing.assert_close(got, _dense(*whole, scale=0.25), atol=1e-5, rtol=1e-5)


def check_triton_kernel(dtype: torch.dtype) -> None:
    from kvslim.kernels.paged_attention import paged_decode

    device = "cuda" if torch.cuda.is_available() else "cpu"
    case = [t.to(device) for t in _case(1, dtype)]
    want = paged_decode_ref(*case, scale=0.25).float()
    # float32 pages on a GPU: Triton's dots run in TF32 (10-bit mantissa), ~2e-3 off the float32 reference
    tol = 3e-2 if dtype == torch.bfloat16 else 5e-3 if device == "cuda" else 1e-3
    # splits: as many as fill the device, or the blocks shared by several programs, then merged; tiles of one
    # page per loop step, or of several (the last tile of a split then runs past its chunk and is masked)
    for splits, tile_tokens in ((None, 16), (3, 16), (None, 64), (2, 32), (3, 48)):
        got = paged_decode(*case, scale=0.25, splits=splits, tile_tokens=tile_tokens).float()
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    # ThinK: keys of KEPT channels (padded in the kernel), values of 16; then Qwen-shaped (group 7, 32 of 64)
    for shape in ({}, QWEN_SHAPED):
        thin, newest, _ = _thin_case(2, dtype, **shape)
        thin, newest = [t.to(device) for t in thin], newest.to(device)
        want = paged_decode_ref(*thin, scale=0.25, newest=newest).float()
        for splits in (None, 3):
            got = paged_decode(*thin, scale=0.25, splits=splits, newest=newest).float()
            torch.testing.assert_close(got, want, atol=tol, rtol=tol)


check_all_dtypes = each_dtype(check_triton_kernel)


def test_triton_kernel_matches_reference() -> None:
    """bf16 and float32 pages. On a GPU in process; on a CPU in a child process under Triton's interpreter,
    which must be switched on before Triton is first imported (this process imported it already)."""
    pytest.importorskip("triton")
    natively_or_interpreted(__file__, check_all_dtypes)


if __name__ == "__main__":
    check_all_dtypes()
