"""Quest's kernels: the block scorer and the sparse paged decode, references against brute force, Triton against
the references (on a CPU under Triton's interpreter, in a child process)."""
from __future__ import annotations

import pytest
import torch

from kvslim.kernels.paged_attention_ref import paged_decode_ref
from kvslim.kernels.quest_ref import (
    fold_block_extrema_ref,
    force_pages,
    paged_sparse_decode_ref,
    pick_pages,
    quest_block_scores_ref,
)
from interpreted import run_interpreted

BLOCK, DIM, Q_HEADS, KV_HEADS, WIDTH = 16, 16, 4, 2, 5


def _pool(seed: int, dtype: torch.dtype = torch.float32):
    """3 sequences of ragged per-head lengths in shuffled blocks, their block extrema, a query per sequence."""
    gen = torch.Generator().manual_seed(seed)
    batch = 3
    blocks = batch * WIDTH + 1
    k_pages = torch.randn(blocks, BLOCK, KV_HEADS, DIM, generator=gen).to(dtype)
    v_pages = torch.randn(blocks, BLOCK, KV_HEADS, DIM, generator=gen).to(dtype)
    tables = torch.randperm(blocks, generator=gen)[: batch * WIDTH].view(batch, WIDTH).int()
    lens = torch.tensor([[5 * BLOCK, 3 * BLOCK + 2], [7, 1], [4 * BLOCK + 1, 2 * BLOCK]])
    tables[1, 1:] = -1  # a short sequence holds one block
    kmin = k_pages.amin(1)
    kmax = k_pages.amax(1)
    query = torch.randn(batch, Q_HEADS, DIM, generator=gen).to(dtype)
    return query, k_pages, v_pages, tables, lens, kmin, kmax


def _brute_bounds(query, k_pages, tables, lens):
    """Per (sequence, KV head, block): the largest over the group's query heads of sum_d max(q*min, q*max), from
    the block's held keys."""
    batch, group = query.shape[0], Q_HEADS // KV_HEADS
    out = torch.full((batch, KV_HEADS, WIDTH), float("-inf"))
    for b in range(batch):
        for h in range(KV_HEADS):
            for j in range(WIDTH):
                if j * BLOCK >= lens[b, h]:
                    continue
                keys = k_pages[int(tables[b, j]), :, h].float()
                low, high = keys.amin(0), keys.amax(0)
                q = query[b, h * group : (h + 1) * group].float()
                out[b, h, j] = torch.maximum(q * low, q * high).sum(-1).max()
    return out


def test_block_bound_is_an_upper_bound_of_every_score_and_matches_brute_force() -> None:
    query, k_pages, _, tables, lens, kmin, kmax = _pool(0)
    bounds = quest_block_scores_ref(query, kmin, kmax, tables, lens, BLOCK, sinks=0)
    brute = _brute_bounds(query, k_pages, tables, lens)
    newest = (lens - 1) // BLOCK
    assert bool((bounds.gather(-1, newest[..., None]) == float("inf")).all())  # the newest block is always read
    bounds.scatter_(-1, newest[..., None], brute.gather(-1, newest[..., None]))
    torch.testing.assert_close(bounds, brute)
    group = Q_HEADS // KV_HEADS
    for b, h, j in [(0, 0, 4), (2, 1, 1), (0, 1, 3)]:
        keys = k_pages[int(tables[b, j]), :, h]
        scores = query[b, h * group : (h + 1) * group] @ keys.T
        assert bool((scores <= bounds[b, h, j] + 1e-5).all())


def test_pages_read_are_newest_and_sinks_then_the_highest_bounds() -> None:
    bounds = torch.tensor([[[0.0, 5.0, 1.0, 4.0, 3.0, 9.0]]])
    newest = torch.tensor([[4]])  # page 5 does not exist yet, whatever its bound
    assert pick_pages(force_pages(bounds, newest, 1), 3).tolist() == [[[0, 1, 4]]]  # sink 0, newest 4, best 1
    assert pick_pages(force_pages(bounds, newest, 0), 3).tolist() == [[[1, 3, 4]]]
    assert pick_pages(force_pages(bounds, torch.tensor([[1]]), 1), 4).tolist() == [[[0, 1, -1, -1]]]  # two pages


def test_folding_keys_one_by_one_gives_each_blocks_extrema() -> None:
    """Blocks written slot by slot, the first slot of a block overwriting what a former owner left."""
    gen = torch.Generator().manual_seed(4)
    keys = torch.randn(40, 2, KV_HEADS, DIM, generator=gen)  # 40 steps of 2 sequences
    kmin, kmax = torch.randn(2, 6, KV_HEADS, DIM, generator=gen)  # stale contents
    tables = torch.tensor([[3, 0, 5], [1, 4, 2]])
    for t in range(40):
        slots = (tables[:, t // BLOCK] * BLOCK + t % BLOCK)[:, None].expand(-1, KV_HEADS)
        fold_block_extrema_ref(kmin, kmax, slots, keys[t], BLOCK)
    for b in range(2):
        for j, count in enumerate((16, 16, 8)):
            written = keys[j * BLOCK : j * BLOCK + count, b]
            torch.testing.assert_close(kmin[tables[b, j]], written.amin(0), rtol=0, atol=0)
            torch.testing.assert_close(kmax[tables[b, j]], written.amax(0), rtol=0, atol=0)


def test_sparse_reference_selecting_every_block_equals_full_paged_decode() -> None:
    query, k_pages, v_pages, tables, lens, *_ = _pool(1)
    every = torch.arange(WIDTH).expand(3, KV_HEADS, -1).clone()
    every[1] = torch.tensor([0, -1, -1, -1, -1])
    zeros = torch.zeros(3, dtype=torch.int32)
    want = paged_decode_ref(query, k_pages, v_pages, tables, lens, zeros, zeros, 0.25)
    got = paged_sparse_decode_ref(query, k_pages, v_pages, tables, every, lens, 0.25)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_sparse_reference_attends_over_the_selected_blocks_only() -> None:
    query, k_pages, v_pages, tables, lens, *_ = _pool(2)
    selected = torch.tensor([[1, 4], [0, 3]])[None].expand(3, -1, -1).clone()
    selected[1] = torch.tensor([[0, -1], [0, -1]])
    got = paged_sparse_decode_ref(query, k_pages, v_pages, tables, selected, lens, 0.25)
    group = Q_HEADS // KV_HEADS
    for b in range(3):
        for h in range(KV_HEADS):
            slots = [s for j in selected[b, h].tolist() if j >= 0 for s in range(j * BLOCK, (j + 1) * BLOCK)
                     if s < lens[b, h]]
            keys = torch.stack([k_pages[int(tables[b, s // BLOCK]), s % BLOCK, h] for s in slots])
            values = torch.stack([v_pages[int(tables[b, s // BLOCK]), s % BLOCK, h] for s in slots])
            q = query[b, h * group : (h + 1) * group]
            want = torch.softmax(q @ keys.T * 0.25, -1) @ values
            torch.testing.assert_close(got[b, h * group : (h + 1) * group], want, atol=1e-5, rtol=1e-5)


def check_triton_kernels(dtype: torch.dtype) -> None:
    from kvslim.kernels.quest import fold_block_extrema, paged_sparse_decode, quest_block_scores

    device = "cuda" if torch.cuda.is_available() else "cpu"
    query, k_pages, v_pages, tables, lens, kmin, kmax = (t.to(device) for t in _pool(3, dtype))
    for sinks in (0, 1):
        want = quest_block_scores_ref(query, kmin, kmax, tables, lens, BLOCK, sinks)
        got = quest_block_scores(query, kmin, kmax, tables, lens, BLOCK, sinks)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    selected = pick_pages(want, 3)
    slots = torch.tensor([[16, 17], [35, 62], [80, 95]], device=device)  # flat slots of distinct (block, head)s
    new = torch.randn(3, KV_HEADS, DIM, device=device).to(dtype)
    mins, maxs = kmin.clone(), kmax.clone()
    fold_block_extrema_ref(mins, maxs, slots, new, BLOCK)
    fold_block_extrema(kmin, kmax, slots, new, BLOCK)
    torch.testing.assert_close(kmin, mins, rtol=0, atol=0)
    torch.testing.assert_close(kmax, maxs, rtol=0, atol=0)
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-3
    reference = paged_sparse_decode_ref(query, k_pages, v_pages, tables, selected, lens, 0.25).float()
    for splits in (None, 2):  # one program per head's selected blocks; then the blocks split and merged
        out = paged_sparse_decode(query, k_pages, v_pages, tables, selected, lens, 0.25, splits).float()
        torch.testing.assert_close(out, reference, atol=tol, rtol=tol)


def test_triton_kernels_match_references() -> None:
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        for dtype in (torch.bfloat16, torch.float32):
            check_triton_kernels(dtype)
        return
    run_interpreted(__file__, timeout_s=300)


if __name__ == "__main__":
    for dtype in (torch.bfloat16, torch.float32):
        check_triton_kernels(dtype)
