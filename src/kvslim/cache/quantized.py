"""Quantized KV storage: packed codes plus fp16 scales, ragged per (sequence, KV head).

A :class:`QuantizedSegment` stores its tokens' rows in (batch, head, token) order, exactly like
:class:`~kvslim.cache.segments.DenseSegment`, through one *codec* for keys and one for values:

* :class:`TokenGroups`: each token's channels in groups of ``group``, one fp16 scale and zero point (the
  group's minimum) per group: asymmetric 2-, 4- or 8-bit codes. KIVI's values; int8/int4 keys and values.
* :class:`ChannelGroups`: KIVI's keys (Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization
  for KV Cache", arXiv:2402.02750). Key outliers sit in a few fixed channels, so a per-token group would
  spend its whole range on them; KIVI instead gives each channel of a run of ``group`` consecutive tokens
  (of one sequence and head) its own scale and zero point.
* :class:`Float8`: e4m3 codes with one fp16 scale per token and head (kvslim's ``fp8``);
  :class:`~kvslim.cache.fp8.ScaledFloat8` holds vLLM's ``fp8_e4m3``/``fp8_e5m2`` with static scales per
  sequence (and head) instead.

Integer codes are really packed (2-bit four to a byte, 4-bit two to a byte), so ``nbytes`` is what memory
holds. Dequantized keys and values exist only inside ``dense()``, while one layer attends.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import Tensor

from .segments import Segment, ragged_to_padded

FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def _per_byte(bits: int) -> int:
    if bits not in (2, 4, 8):
        raise ValueError(f"bits={bits}: integer codes are 2, 4 or 8 bits wide")
    return 8 // bits


def pack(codes: Tensor, bits: int) -> Tensor:
    """Pack codes (..., D) below ``2**bits`` into (..., D*bits/8) bytes.

    Channel ``c`` sits in byte ``c // (8/bits)`` at bit ``(c % (8/bits)) * bits``, lowest bits first (the
    usual nibble order), so a kernel unpacks a row by interleaving the shifted bytes.
    """
    per = _per_byte(bits)
    codes = codes.to(torch.uint8)
    if per == 1:
        return codes.contiguous()
    if codes.shape[-1] % per:
        raise ValueError(f"cannot pack {codes.shape[-1]} channels {per} to a byte: head_dim must be a multiple of {per}")
    slots = codes.reshape(*codes.shape[:-1], -1, per)
    out = slots[..., 0].clone()
    for s in range(1, per):
        out |= slots[..., s] << (s * bits)
    return out


def unpack(packed: Tensor, bits: int) -> Tensor:
    """Inverse of :func:`pack`: (..., B) bytes to (..., B*8/bits) uint8 codes."""
    per = _per_byte(bits)
    if per == 1:
        return packed
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & (2**bits - 1)).flatten(-2)


def quantize_asym(x: Tensor, bits: int, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Codes (uint8), fp16 scale and fp16 zero point (the minimum) of ``x``, one scale per slice along ``dim``.

    Codes are rounded against the *stored* fp16 scale and zero, so dequantizing ``code * scale + zero``
    is off by at most half a step (plus the zero point's fp16 rounding).
    """
    x = x.float()
    top = 2**bits - 1
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale, zero = ((hi - lo) / top).half(), lo.half()
    step = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
    codes = ((x - zero.float()) / step).round_().clamp_(0, top).to(torch.uint8)
    return codes, scale, zero


def merge_order(older: Tensor, newer: Tensor) -> Tensor:
    """Row order that interleaves two ragged row sets, each sorted by (sequence, head), older rows first per head.

    ``older`` and ``newer`` give each row's flat (sequence, head) index; a stable sort keeps time order.
    """
    return torch.cat([older, newer]).argsort(stable=True)


def interleave_rows(older: Tensor, newer: Tensor, rows: int) -> Tensor:
    """The rows of ``older`` then ``newer`` for each of ``rows`` (sequence, head)s when each holds an equal number of
    rows in each: what :func:`merge_order` gives such rows, by a reshape instead of a sort."""
    rest = older.shape[1:]
    return torch.cat([older.view(rows, -1, *rest), newer.view(rows, -1, *rest)], 1).view(-1, *rest)


def _nbytes(*tensors: Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class Codec(Protocol):
    """One tensor's (keys' or values') rows in a packed format."""

    format: tuple

    def decode(self, heads: Tensor | None = None) -> Tensor:
        """(N, D) float32 dequantized rows; ``heads``: each row's flat (sequence, head) index, which formats whose
        scales are per sequence (:class:`~kvslim.cache.fp8.ScaledFloat8`) need and per-row formats ignore."""
        ...

    def take(self, rows: Tensor) -> "Codec":
        """Only the rows with these (ascending) indices."""
        ...

    def concat(self, newer: "Codec", heads: Tensor, newer_heads: Tensor) -> "Codec":
        """Rows of both, each (sequence, head)'s own rows first; ``heads`` give each row's flat head index."""
        ...

    def interleave(self, newer: "Codec", rows: int) -> "Codec | None":
        """:meth:`concat` when each of ``rows`` (sequence, head)s holds an equal number of rows in each codec (no
        sort, no host sync); None where the format cannot tell (then :meth:`concat` serves)."""
        ...

    def nbytes(self) -> int:
        """Bytes held: codes, scales, zero points, run sizes."""
        ...


class TokenGroups:
    """Per-token asymmetric integer codes: each token's ``group`` consecutive channels share a scale and zero."""

    def __init__(self, codes: Tensor, scale: Tensor, zero: Tensor, bits: int, group: int):
        self.codes, self.scale, self.zero, self.bits, self.group = codes, scale, zero, bits, group
        self.format = ("token", bits, group)

    @classmethod
    def encode(cls, rows: Tensor, bits: int, group: int) -> "TokenGroups":
        n, dim = rows.shape
        if dim % group:
            raise ValueError(f"group={group} channels must divide head_dim={dim}")
        codes, scale, zero = quantize_asym(rows.reshape(n, dim // group, group), bits, -1)
        return cls(pack(codes.reshape(n, dim), bits), scale.reshape(n, -1), zero.reshape(n, -1), bits, group)

    def decode(self, heads: Tensor | None = None) -> Tensor:
        codes = unpack(self.codes, self.bits).float()
        n, dim = codes.shape
        groups = codes.view(n, dim // self.group, self.group)
        return (groups * self.scale.float().unsqueeze(-1) + self.zero.float().unsqueeze(-1)).view(n, dim)

    def take(self, rows: Tensor) -> "TokenGroups":
        return TokenGroups(self.codes[rows], self.scale[rows], self.zero[rows], self.bits, self.group)

    def concat(self, newer: "TokenGroups", heads: Tensor, newer_heads: Tensor) -> "TokenGroups":
        order = merge_order(heads, newer_heads)
        parts = [torch.cat([a, b])[order] for a, b in ((self.codes, newer.codes), (self.scale, newer.scale),
                                                          (self.zero, newer.zero))]
        return TokenGroups(*parts, self.bits, self.group)

    def interleave(self, newer: "TokenGroups", rows: int) -> "TokenGroups":
        return TokenGroups(*(interleave_rows(a, b, rows) for a, b in ((self.codes, newer.codes),
                                                                       (self.scale, newer.scale),
                                                                       (self.zero, newer.zero))),
                           self.bits, self.group)

    def nbytes(self) -> int:
        return _nbytes(self.codes, self.scale, self.zero)


class ChannelGroups:
    """KIVI keys: per channel, a run of ``group`` consecutive tokens of one (sequence, head) shares a scale and zero.

    Codes are stored per token (packed along channels); scales and zeros per run, (runs, D). Runs are
    quantized whole. Eviction never re-quantizes: a kept token's codes stay exact under its run's scale
    and zero, so :meth:`take` only drops codes and, once a run has lost tokens, records every run's size
    in ``sizes`` (int16, one per run, counted in :meth:`nbytes`); a run left empty is dropped with its
    scales. While every run is whole, ``sizes`` is None and a token's run is ``first_run + t // group``.
    """

    def __init__(self, codes: Tensor, scale: Tensor, zero: Tensor, sizes: Tensor | None, bits: int, group: int):
        self.codes, self.scale, self.zero, self.sizes, self.bits, self.group = codes, scale, zero, sizes, bits, group
        self.format = ("channel", bits, group)

    @classmethod
    def encode(cls, rows: Tensor, bits: int, group: int) -> "ChannelGroups":
        """Rows must hold whole runs: each (sequence, head)'s row count a multiple of ``group``."""
        n, dim = rows.shape
        if n % group:
            raise ValueError(f"KIVI keys are quantized in whole runs of group={group} tokens, got {n} rows")
        if group >= 2**15:
            raise ValueError(f"group={group} tokens is too large: run sizes are stored as int16")
        codes, scale, zero = quantize_asym(rows.reshape(n // group, group, dim), bits, 1)
        return cls(pack(codes.reshape(n, dim), bits), scale.squeeze(1), zero.squeeze(1), None, bits, group)

    def run_sizes(self) -> Tensor:
        if self.sizes is not None:
            return self.sizes.long()
        return torch.full((self.scale.shape[0],), self.group, dtype=torch.long, device=self.scale.device)

    def token_runs(self) -> Tensor:
        """(N,) the run (row of ``scale``) of each token."""
        return torch.arange(self.scale.shape[0], device=self.scale.device).repeat_interleave(self.run_sizes())

    def _with_sizes(self, codes: Tensor, scale: Tensor, zero: Tensor, sizes: Tensor) -> "ChannelGroups":
        whole = bool((sizes == self.group).all())
        return ChannelGroups(codes, scale, zero, None if whole else sizes.to(torch.int16), self.bits, self.group)

    def decode(self, heads: Tensor | None = None) -> Tensor:
        codes = unpack(self.codes, self.bits).float()
        if self.sizes is None:  # whole runs: broadcast each run's scales over its tokens, no per-token gather
            runs = codes.view(-1, self.group, codes.shape[-1])
            return (runs * self.scale.float().unsqueeze(1) + self.zero.float().unsqueeze(1)).view_as(codes)
        runs = self.token_runs()
        return codes * self.scale[runs].float() + self.zero[runs].float()

    def take(self, rows: Tensor) -> "ChannelGroups":
        counts = torch.bincount(self.token_runs()[rows], minlength=self.scale.shape[0])
        kept = counts > 0
        return self._with_sizes(self.codes[rows], self.scale[kept], self.zero[kept], counts[kept])

    def concat(self, newer: "ChannelGroups", heads: Tensor, newer_heads: Tensor) -> "ChannelGroups":
        sizes, newer_sizes = self.run_sizes(), newer.run_sizes()
        run_heads = heads[sizes.cumsum(0) - sizes]  # a run's head is its first token's
        newer_run_heads = newer_heads[newer_sizes.cumsum(0) - newer_sizes]
        tokens, runs = merge_order(heads, newer_heads), merge_order(run_heads, newer_run_heads)
        return self._with_sizes(
            torch.cat([self.codes, newer.codes])[tokens],
            torch.cat([self.scale, newer.scale])[runs],
            torch.cat([self.zero, newer.zero])[runs],
            torch.cat([sizes, newer_sizes])[runs],
        )

    def interleave(self, newer: "ChannelGroups", rows: int) -> "ChannelGroups | None":
        """Whole runs only: each (sequence, head)'s runs are then its rows over ``group``, in order."""
        if self.sizes is not None or newer.sizes is not None:
            return None
        return ChannelGroups(*(interleave_rows(a, b, rows) for a, b in ((self.codes, newer.codes),
                                                                         (self.scale, newer.scale),
                                                                         (self.zero, newer.zero))),
                             None, self.bits, self.group)

    def nbytes(self) -> int:
        return _nbytes(self.codes, self.scale, self.zero, self.sizes)


class Float8:
    """e4m3 codes with one fp16 scale per token (absmax / 448): symmetric, as vLLM's scaled fp8 KV cache."""

    format = ("fp8",)

    def __init__(self, codes: Tensor, scale: Tensor):
        self.codes, self.scale = codes, scale

    @classmethod
    def encode(cls, rows: Tensor) -> "Float8":
        rows = rows.float()
        scale = (rows.abs().amax(-1, keepdim=True) / FP8_MAX).half()
        step = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
        return cls((rows / step).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale)

    def decode(self, heads: Tensor | None = None) -> Tensor:
        return self.codes.float() * self.scale.float()

    def take(self, rows: Tensor) -> "Float8":
        return Float8(self.codes[rows], self.scale[rows])

    def concat(self, newer: "Float8", heads: Tensor, newer_heads: Tensor) -> "Float8":
        order = merge_order(heads, newer_heads)
        return Float8(torch.cat([self.codes, newer.codes])[order], torch.cat([self.scale, newer.scale])[order])

    def interleave(self, newer: "Float8", rows: int) -> "Float8":
        return Float8(interleave_rows(self.codes, newer.codes, rows), interleave_rows(self.scale, newer.scale, rows))

    def nbytes(self) -> int:
        return _nbytes(self.codes, self.scale)


Encoder = Callable[[Tensor], Codec]


class QuantizedSegment(Segment):
    """Tokens whose keys and values are stored packed; ``dtype`` is the compute dtype ``dense()`` returns."""

    #: tokens every (sequence, head) holds when a quantizer packed the same count in each (a decoding tail's oldest
    #: columns, known on the host), else None. Then :meth:`concat` interleaves rows without a sort or a host sync.
    per_row: int | None = None

    def __init__(self, keys: Codec, values: Codec, lengths: Tensor, dtype: torch.dtype):
        self.keys, self.values, self.lengths, self.dtype = keys, values, lengths, dtype

    @classmethod
    def from_padded(cls, keys: Tensor, values: Tensor, keep: Tensor, encode_keys: Encoder,
                    encode_values: Encoder) -> "QuantizedSegment":
        """Quantize the rows of (B,H,T,D) keys/values where ``keep`` (B,H,T) is True."""
        return cls(encode_keys(keys[keep]), encode_values(values[keep]), keep.sum(-1), keys.dtype)

    @property
    def format(self) -> tuple:
        """Segments of one format (and compute dtype) can be concatenated."""
        return self.keys.format, self.values.format, self.dtype

    def row_heads(self) -> Tensor:
        """(N,) each stored row's flat (sequence, head) index."""
        heads = torch.arange(self.lengths.numel(), device=self.lengths.device)
        return heads.repeat_interleave(self.lengths.flatten())

    @property
    def longest(self) -> int:
        """Read once (a host sync): a packed segment's lengths never change, and decoding reads it every step."""
        if getattr(self, "_longest", None) is None:
            self._longest = super().longest if self.per_row is None else self.per_row
        return self._longest

    def dense(self) -> tuple[Tensor, Tensor, Tensor]:
        heads = self.row_heads()
        keys, valid = ragged_to_padded(self.keys.decode(heads).to(self.dtype), self.lengths, self.longest)
        values, _ = ragged_to_padded(self.values.decode(heads).to(self.dtype), self.lengths, self.longest)
        return keys, values, valid

    def select(self, keep: Tensor) -> "QuantizedSegment":
        """Keep tokens by taking their codes: per-token formats and KIVI keys alike never re-quantize."""
        rows, valid = ragged_to_padded(torch.arange(self.tokens, device=self.lengths.device), self.lengths)
        mask = keep & valid
        kept = rows[mask]
        return QuantizedSegment(self.keys.take(kept), self.values.take(kept), mask.sum(-1), self.dtype)

    def concat(self, newer: "QuantizedSegment") -> "QuantizedSegment":
        """One segment holding this one's tokens, then ``newer``'s, for every (sequence, head)."""
        if newer.format != self.format:
            raise ValueError(f"cannot concatenate quantized segments of formats {self.format} and {newer.format}")
        if self.per_row is not None and newer.per_row is not None:
            rows = self.lengths.numel()
            keys, values = self.keys.interleave(newer.keys, rows), self.values.interleave(newer.values, rows)
            if keys is not None and values is not None:
                merged = QuantizedSegment(keys, values, self.lengths + newer.lengths, self.dtype)
                merged.per_row = self.per_row + newer.per_row
                return merged
        heads, newer_heads = self.row_heads(), newer.row_heads()
        return QuantizedSegment(self.keys.concat(newer.keys, heads, newer_heads),
                                self.values.concat(newer.values, heads, newer_heads),
                                self.lengths + newer.lengths, self.dtype)

    def nbytes(self) -> int:
        return self.keys.nbytes() + self.values.nbytes()
