"""Tier entries: round trip of every pool dtype, and rejection of anything not whole, intact and ours."""
from __future__ import annotations

import pytest
import torch

from kvslim.cache.tier import CorruptEntry
from kvslim.cache.tier.entry import decode, encode

OURS, THEIRS = bytes(range(16)), bytes(range(1, 17))


def _block() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 4, 2, 8, generator=g).to(torch.bfloat16), torch.randint(0, 255, (2, 4, 2, 4), generator=g,
            dtype=torch.uint8), torch.randn(2, 1, 2, 8, generator=g).to(torch.float16),
            torch.randn(3, 5, generator=g).to(torch.float8_e4m3fn)]


def test_round_trip_is_bit_exact() -> None:
    tensors = _block()
    back = decode(OURS, encode(OURS, tensors))
    assert [(t.dtype, t.shape) for t in back] == [(t.dtype, t.shape) for t in tensors]
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(back, tensors))


def test_packed_bytes_travel_as_they_are() -> None:
    tensors = _block()
    payload = sum(t.numel() * t.element_size() for t in tensors)
    assert payload < len(encode(OURS, tensors)) < payload + 200  # header + tensor table only


@pytest.mark.parametrize("damage", ["flip", "truncate", "magic", "fingerprint", "empty"])
def test_damaged_or_foreign_entries_are_rejected(damage: str) -> None:
    data = bytearray(encode(OURS, _block()))
    reader = OURS
    if damage == "flip":
        data[-5] ^= 0x40
    elif damage == "truncate":
        data = data[: len(data) - 7]
    elif damage == "magic":
        data[:8] = b"NOTKVSLM"
    elif damage == "fingerprint":
        reader = THEIRS
    else:
        data = bytearray(b"\x00")
    with pytest.raises(CorruptEntry):
        decode(reader, bytes(data))
