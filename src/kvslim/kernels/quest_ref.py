"""Quest's page selection and sparse paged decode in plain PyTorch: the references the Triton kernels
(:mod:`kvslim.kernels.quest`) are tested against, the engine's CPU path, and the rule the Hugging Face
path (:mod:`kvslim.cache.quest`) runs, so both paths select the same pages.

Quest (Tang et al. 2024) keeps, per page of ``P`` tokens and KV head, the element-wise minimum and maximum
of its keys. For a query ``q`` no key ``k`` of the page can score more than
``sum_d max(q_d * min_d, q_d * max_d)``: an upper bound of ``q·k`` read from two vectors instead of ``P``
keys. A KV head's bound is the largest over its group's query heads (GQA: the page must be read if any of
them may attend to it). Each decoding step reads the ``top`` pages of highest bound, always including the
newest page (it holds the token being decoded) and the first ``sinks`` pages (attention sinks):
:func:`force_pages` scores them, :func:`pick_pages` takes the best.
"""
from __future__ import annotations

import torch
from torch import Tensor

#: the bound given to pages that are always read (newest, sinks): above any real bound
FORCED = float("inf")


def page_bounds(queries: Tensor, kmin: Tensor, kmax: Tensor) -> Tensor:
    """Upper bounds (B, H, N) float32 of ``q·k`` per page: queries (B, H, G, D) grouped per KV head, page key
    minima and maxima (B, H, N, D); the largest over the G query heads of each group.

    ``max(q_d * min_d, q_d * max_d) = q_d * c_d + |q_d| * r_d`` with the page's centre ``c = (max + min) / 2`` and
    radius ``r = (max - min) / 2``: two matrix products instead of a (G, N, D) product tensor.
    """
    q, low, high = queries.float(), kmin.float(), kmax.float()
    centre, radius = (high + low) / 2, (high - low) / 2
    return (q @ centre.transpose(-1, -2) + q.abs() @ radius.transpose(-1, -2)).amax(2)


def force_pages(bounds: Tensor, newest: Tensor, sinks: int) -> Tensor:
    """Scores (B, H, N) float32 from page bounds: the newest page ``newest`` (B, H) (it holds the token being
    decoded) and the first ``sinks`` pages are always read (+inf); pages past the newest do not exist (-inf)."""
    page = torch.arange(bounds.shape[-1], device=bounds.device)
    exists = page <= newest.unsqueeze(-1)
    forced = exists & ((page < sinks) | (page == newest.unsqueeze(-1)))
    return torch.where(forced, FORCED, bounds.float()).masked_fill(~exists, float("-inf"))


def pick_pages(scores: Tensor, top: int) -> Tensor:
    """The ``k = min(top, N)`` pages (B, H, k) of highest score per KV head, ascending; -1 where a head has fewer.

    The shape depends on ``top`` and ``N`` only (a CUDA graph can replay it); reading pages in time order keeps
    the attention's summation order that of a full read when every page is selected.
    """
    width = scores.shape[-1]
    best, index = scores.topk(min(top, width), dim=-1)
    index = torch.where(best > float("-inf"), index, width).sort(-1).values  # no page: sorts last
    return torch.where(index < width, index, -1)


def quest_block_scores_ref(query: Tensor, kmin: Tensor, kmax: Tensor, block_tables: Tensor, lens: Tensor,
                           block_size: int, sinks: int) -> Tensor:
    """Scores (B, H, M) of each sequence's blocks in the engine's paged pool, as :func:`force_pages` gives them.

    query (B, Hq, D); kmin/kmax (num_blocks, H, D) one layer's block minima and maxima; block_tables (B, M);
    lens (B, H) tokens held per KV head, the one being decoded included.
    """
    batch, q_heads, dim = query.shape
    kv_heads = kmin.shape[1]
    tables = block_tables.clamp(min=0).long()
    low, high = (x[tables].transpose(1, 2) for x in (kmin, kmax))  # (B, H, M, D)
    bounds = page_bounds(query.view(batch, kv_heads, q_heads // kv_heads, dim), low, high)
    return force_pages(bounds, (lens - 1) // block_size, sinks)


def fold_block_extrema_ref(kmin: Tensor, kmax: Tensor, slots: Tensor, keys: Tensor, block_size: int) -> None:
    """Fold each head's new key (B, H, D) into the extrema (num_blocks, H, D) of the block holding its flat slot
    (B, H); a key at a block's first slot starts them afresh (a reused block carries nothing stale)."""
    heads = torch.arange(keys.shape[1], device=keys.device).expand_as(slots)
    block = slots // block_size
    first = (slots % block_size == 0)[..., None]
    kmin[block, heads] = torch.where(first, keys, torch.minimum(kmin[block, heads], keys))
    kmax[block, heads] = torch.where(first, keys, torch.maximum(kmax[block, heads], keys))


def paged_sparse_decode_ref(query: Tensor, k_pages: Tensor, v_pages: Tensor, block_tables: Tensor, selected: Tensor,
                            lens: Tensor, scale: float) -> Tensor:
    """Attention of one new query per sequence over the selected blocks only: the blocks are gathered first, so
    only their keys and values are read.

    query (B, Hq, D); pages (N, bs, H, D); block_tables (B, M); selected (B, H, k) block positions in the table
    (ascending, -1: none); lens (B, H) tokens held per KV head. Returns (B, Hq, D) in the query's dtype.
    """
    batch, q_heads, dim = query.shape
    block_size, kv_heads = k_pages.shape[1], k_pages.shape[2]
    picked = selected.clamp(min=0).long()
    blocks = block_tables.long().gather(1, picked.flatten(1)).view_as(picked).clamp(min=0)  # (B, H, k)
    head = torch.arange(kv_heads, device=query.device)[None, :, None]
    keys = k_pages[blocks, :, head].float().flatten(2, 3)  # (B, H, k * bs, D)
    values = v_pages[blocks, :, head].float().flatten(2, 3)
    slot = picked[..., None] * block_size + torch.arange(block_size, device=query.device)
    visible = ((selected[..., None] >= 0) & (slot < lens[..., None, None])).flatten(2)  # (B, H, k * bs)
    q = query.float().view(batch, kv_heads, q_heads // kv_heads, dim)
    scores = torch.einsum("bhgd,bhtd->bhgt", q, keys) * scale
    probs = scores.masked_fill(~visible[:, :, None, :], float("-inf")).softmax(-1)
    return torch.einsum("bhgt,bhtd->bhgd", probs, values).reshape(batch, q_heads, -1).to(query.dtype)
