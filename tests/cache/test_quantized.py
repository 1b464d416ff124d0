"""Packed KV storage: exact packing, exact byte counts, error bounds, and select/concat that never re-quantize."""
from __future__ import annotations

from functools import partial

import pytest
import torch

from kvslim.cache.quantized import ChannelGroups, Float8, QuantizedSegment, TokenGroups, pack, unpack
from kvslim.cache.segments import ragged_to_padded

B, H, T, D = 2, 3, 64, 32


def data(seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, T, D, generator=gen).to(dtype), torch.randn(B, H, T, D, generator=gen).to(dtype)


def ragged_keep(multiple: int = 1) -> torch.Tensor:
    """(B,H,T) keep mask: each (sequence, head) holds its own count of leading tokens, a multiple of ``multiple``."""
    lengths = torch.tensor([[64, 32, 16], [48, 0, 64]]) // multiple * multiple
    return torch.arange(T) < lengths.unsqueeze(-1)


FORMATS = {
    "kivi2": (partial(ChannelGroups.encode, bits=2, group=16), partial(TokenGroups.encode, bits=2, group=16)),
    "kivi4": (partial(ChannelGroups.encode, bits=4, group=16), partial(TokenGroups.encode, bits=4, group=16)),
    "int8": (partial(TokenGroups.encode, bits=8, group=32), partial(TokenGroups.encode, bits=8, group=32)),
    "int4": (partial(TokenGroups.encode, bits=4, group=8), partial(TokenGroups.encode, bits=4, group=8)),
    "fp8": (Float8.encode, Float8.encode),
}


def segment(name: str, seed: int = 0) -> QuantizedSegment:
    keys, values = data(seed)
    return QuantizedSegment.from_padded(keys, values, ragged_keep(16), *FORMATS[name])


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_round_trip_is_exact(bits: int) -> None:
    codes = torch.randint(0, 2**bits, (5, 7, 64), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (5, 7, 64 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack(packed, bits), codes)


def test_pack_layout_puts_low_channels_in_low_bits() -> None:
    assert pack(torch.tensor([[1, 2, 3, 0]]), 2).tolist() == [[1 | 2 << 2 | 3 << 4]]
    assert pack(torch.tensor([[5, 12]]), 4).tolist() == [[5 | 12 << 4]]


def test_pack_rejects_bad_widths() -> None:
    with pytest.raises(ValueError, match="bits"):
        pack(torch.zeros(1, 8, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="multiple of 4"):
        pack(torch.zeros(1, 6, dtype=torch.uint8), 2)


def analytic_nbytes(name: str, tokens: int) -> int:
    """Codes + fp16 scales + fp16 zero points, computed by hand for the formats above."""
    if name == "fp8":
        return 2 * tokens * (D + 2)
    bits = int(name[-1])
    codes = tokens * D * bits // 8
    if name.startswith("kivi"):
        return 2 * codes + tokens // 16 * D * 4 + tokens * (D // 16) * 4
    group = 32 if name == "int8" else 8
    return 2 * (codes + tokens * (D // group) * 4)


@pytest.mark.parametrize("name", list(FORMATS))
def test_nbytes_equals_analytic_size(name: str) -> None:
    seg = segment(name)
    assert seg.tokens == int(ragged_keep(16).sum())
    assert seg.nbytes() == analytic_nbytes(name, seg.tokens)


@pytest.mark.parametrize("name", list(FORMATS))
def test_dense_returns_compute_dtype_and_layout(name: str) -> None:
    keys, values = data()
    seg = segment(name)
    k, v, valid = seg.dense()
    assert k.dtype == v.dtype == torch.bfloat16
    assert torch.equal(valid, ragged_keep(16)[..., : valid.shape[-1]])
    err = (k.float() - keys.float()[..., : k.shape[2], :])[valid].abs().max()
    assert err < 2.0  # a coarse sanity bound; the per-bit bounds are below


@pytest.mark.parametrize(("bits", "rel"), [(2, 0.45), (4, 0.09), (8, 0.006)])
def test_integer_reconstruction_error_bounds(bits: int, rel: float) -> None:
    x = torch.randn(2048, 128, generator=torch.Generator().manual_seed(3))
    for codec in (TokenGroups.encode(x, bits, 32), ChannelGroups.encode(x, bits, 32)):
        out = codec.decode()
        assert (out - x).norm() / x.norm() < rel
        # never more than half a step off (plus the fp16 rounding of the zero point)
        runs = codec.token_runs() if isinstance(codec, ChannelGroups) else None
        step = codec.scale.float()[runs] if runs is not None else codec.scale.float().repeat_interleave(32, 1)
        assert bool(((out - x).abs() <= step / 2 + 1e-3).all())


def test_fp8_reconstruction_error_bound() -> None:
    x = torch.randn(2048, 128, generator=torch.Generator().manual_seed(4)) * 5
    out = Float8.encode(x).decode()
    assert (out - x).norm() / x.norm() < 0.04
    assert bool(((out - x).abs() <= x.abs() / 16 + 1e-3).all())  # e4m3: 3 mantissa bits, half an ulp


def test_kivi_keys_per_channel_beat_per_token_on_outlier_channels() -> None:
    """Keys with a few large fixed channels (what KIVI observed): per-channel runs keep the small channels."""
    gen = torch.Generator().manual_seed(5)
    keys = torch.randn(1024, 128, generator=gen)
    outliers = torch.tensor([3, 50, 77, 100])
    keys[:, outliers] = keys[:, outliers] * 2 + torch.tensor([15.0, -20.0, 25.0, 12.0])
    for bits in (2, 4):
        per_channel = (ChannelGroups.encode(keys, bits, 32).decode() - keys).norm()
        per_token = (TokenGroups.encode(keys, bits, 32).decode() - keys).norm()
        assert per_channel < per_token / 3


@pytest.mark.parametrize("name", list(FORMATS))
def test_select_keeps_codes_exactly(name: str) -> None:
    seg = segment(name)
    k, v, valid = seg.dense()
    keep = torch.rand(valid.shape, generator=torch.Generator().manual_seed(6)) < 0.6
    kept = seg.select(keep)
    mask = keep & valid
    assert torch.equal(kept.lengths, mask.sum(-1))
    k2, v2, valid2 = kept.dense()
    assert torch.equal(k2[valid2], k[mask]) and torch.equal(v2[valid2], v[mask])  # no re-quantization
    assert kept.nbytes() < seg.nbytes()


def test_kivi_select_records_run_sizes_and_drops_empty_runs() -> None:
    seg = segment("kivi2")
    keep = torch.ones(B, H, seg.longest, dtype=torch.bool)
    assert seg.select(keep).nbytes() == seg.nbytes() and seg.select(keep).keys.sizes is None
    keep[0, 0, :16] = False  # a whole run
    keep[0, 0, 20] = False  # one token of the next
    kept = seg.select(keep)
    runs = seg.keys.scale.shape[0] - 1
    assert kept.keys.scale.shape[0] == runs
    assert kept.keys.sizes is not None and kept.keys.sizes.dtype == torch.int16
    assert kept.keys.run_sizes()[:2].tolist() == [15, 16]
    tokens = seg.tokens - 17
    bits_bytes = tokens * D * 2 // 8
    assert kept.nbytes() == 2 * bits_bytes + runs * D * 4 + tokens * (D // 16) * 4 + runs * 2


@pytest.mark.parametrize("name", list(FORMATS))
def test_concat_appends_per_head_in_time_order(name: str) -> None:
    older, newer = segment(name, seed=0), segment(name, seed=1)
    merged = older.concat(newer)
    assert merged.nbytes() == older.nbytes() + newer.nbytes()
    k, v, valid = merged.dense()
    parts = [s.dense() for s in (older, newer)]
    expect_k = torch.cat([p[0] for p in parts], 2)
    expect_valid = torch.cat([p[2] for p in parts], 2)
    ragged = expect_k[expect_valid]
    assert torch.equal(k[valid], ragged)
    assert torch.equal(valid.sum(-1), expect_valid.sum(-1))
    assert torch.equal(v[valid], torch.cat([p[1] for p in parts], 2)[expect_valid])


def uniform_segment(name: str, seed: int, tokens: int) -> QuantizedSegment:
    """Every (sequence, head) holding ``tokens`` packed tokens, marked so (as a quantizer packs a decoding tail)."""
    keys, values = data(seed)
    keep = torch.zeros(B, H, T, dtype=torch.bool)
    keep[..., :tokens] = True
    seg = QuantizedSegment.from_padded(keys, values, keep, *FORMATS[name])
    seg.per_row = tokens
    return seg


@pytest.mark.parametrize("name", list(FORMATS))
def test_concat_of_uniform_segments_interleaves_as_the_sort_does(name: str) -> None:
    """Segments whose rows all hold one count merge by a reshape: the very codes, scales and row order of the sorted
    merge, and the merged segment knows its count (no host sync for ``longest``)."""
    older, newer = uniform_segment(name, 0, 32), uniform_segment(name, 1, 16)
    merged = older.concat(newer)
    older.per_row = None  # the general path: merge_order's stable sort
    sorted_merge = older.concat(newer)
    assert merged.per_row == 48 and merged.longest == 48 and sorted_merge.per_row is None
    for got, want in ((merged.keys, sorted_merge.keys), (merged.values, sorted_merge.values)):
        for field in ("codes", "scale", "zero", "sizes"):
            a, b = getattr(got, field, None), getattr(want, field, None)
            assert (a is None and b is None) or torch.equal(a, b), field
    assert torch.equal(merged.dense()[0], sorted_merge.dense()[0])


def test_concat_after_eviction_keeps_kivi_runs_apart() -> None:
    older = segment("kivi2")
    keep = torch.rand(B, H, older.longest, generator=torch.Generator().manual_seed(7)) < 0.5
    older = older.select(keep)
    newer = segment("kivi2", seed=2)
    merged = older.concat(newer)
    k, _, valid = merged.dense()
    parts = [s.dense() for s in (older, newer)]
    expect = torch.cat([p[0] for p in parts], 2)[torch.cat([p[2] for p in parts], 2)]
    assert torch.equal(k[valid], expect)
    assert merged.keys.sizes is not None


def test_concat_rejects_other_formats() -> None:
    with pytest.raises(ValueError, match="formats"):
        segment("int8").concat(segment("int4"))


def test_rows_are_ragged_like_dense_segments() -> None:
    """Rows in (batch, head, token) order: row i of the codes is the i-th kept token of the padded layout."""
    keys, values = data()
    keep = ragged_keep()
    seg = QuantizedSegment.from_padded(keys, values, keep, *FORMATS["int8"])
    rows, _ = ragged_to_padded(seg.keys.decode(), seg.lengths)
    assert torch.allclose(rows[keep[..., : rows.shape[2]]], keys.float()[keep], atol=0.05)
