"""A PageBatch lays kept tokens out as a cache layer's select does, without host syncs, and knows its counts."""
from __future__ import annotations

import torch

from kvslim.cache.layer import compact
from kvslim.engine.page_batch import PageBatch


def batch_with_choice(seed: int = 0) -> tuple[PageBatch, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(3, 2, 9, 4, generator=gen), torch.randn(3, 2, 9, 5, generator=gen)
    held = torch.tensor([[9, 7], [5, 9], [1, 0]])
    layer = PageBatch(keys, values, held)
    keep = (torch.rand(3, 2, 9, generator=gen) < 0.5) & layer.segments[0].dense()[2]
    layer.select(keep)
    return layer, keys, values


def test_kept_tokens_come_first_in_time_order_and_the_rest_stay_put() -> None:
    layer, keys, values = batch_with_choice()
    keep = layer.kept
    new_keys, new_values = layer.compacted(None)
    count = keep.sum(-1)
    for b in range(3):
        for h in range(2):
            n = int(count[b, h])
            torch.testing.assert_close(new_keys[b, h, :n], keys[b, h][keep[b, h]], rtol=0, atol=0)
            torch.testing.assert_close(new_values[b, h, :n], values[b, h][keep[b, h]], rtol=0, atol=0)
            # past the kept ones every slot is rewritten with its own content: no page changes there
            torch.testing.assert_close(new_keys[b, h, n:], keys[b, h, n:], rtol=0, atol=0)
    scores = torch.rand(3, 2, 9)
    laid = layer.compact_like(scores, keep)
    expected = compact(scores, keep)
    torch.testing.assert_close(laid[..., : expected.shape[-1]], expected, rtol=0, atol=0)
    assert (laid[..., expected.shape[-1] :] == 0).all()


def test_padding_columns_take_the_content_of_the_page_they_read() -> None:
    """Columns 4.. of row 0 read the same pages as columns 0..3 (a shorter sequence's first block repeated): they
    must carry exactly what those get, or two writes to one page would race."""
    layer, _, _ = batch_with_choice(1)
    logical = torch.arange(9)
    columns = torch.stack([torch.where(logical < 4, logical, logical % 4), logical, logical])
    new_keys, new_values = layer.compacted(columns)
    torch.testing.assert_close(new_keys[0, :, 4:8], new_keys[0, :, :4], rtol=0, atol=0)
    torch.testing.assert_close(new_values[0, :, 8], new_values[0, :, 0], rtol=0, atol=0)


def test_fits_is_answered_on_the_host_for_the_known_limit() -> None:
    layer, _, _ = batch_with_choice()
    limit = torch.tensor([[9, 7], [5, 9], [1, 1]])
    layer.know_limit(limit, limit.clone())
    assert layer.fits(limit) and layer.host_limit is not None
    tighter = torch.tensor([[8, 7], [5, 9], [1, 1]])
    layer.know_limit(tighter, tighter.clone())
    assert not layer.fits(tighter)
    assert not layer.fits(tighter.clone())  # another tensor: counted from the device lengths
