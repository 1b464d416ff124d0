"""Low-rank keys and values: each KV head stores rank-R coefficients plus its own basis instead of full rows.

After Palu (Chang et al. 2024, "Palu: Compressing KV-Cache with Low-Rank Projection", arXiv:2407.21118),
Eigen Attention (Saxena et al. 2024, arXiv:2408.05646) and ShadowKV's low-rank keys (Sun et al. 2024,
arXiv:2410.21465), but with no calibration data: at the first prefill, per layer, sequence and KV head, the
basis is the top-``rank`` eigenvectors of the Gram matrix ``X^T X`` of the keys held (and, separately, of the
values), i.e. the right singular vectors of the prompt's own keys/values. Uncentred, so a rank of ``head_dim``
is an orthonormal change of basis and reconstructs exactly (up to float rounding).

Keys are fit and stored *before RoPE*, as Palu and ShadowKV do: the cache holds rotated keys, so each is turned
back by its own position (:func:`rotate`), projected, and turned forward again when read. Why: RoPE turns every
channel pair by a position-dependent angle, so a key set of rank R before RoPE spans up to 2R directions after it,
and a basis fit to rotated keys loses what retrieval needs. Measured on Qwen2.5-Coder-0.5B (head_dim 64), one
RULER-4k niah_single_1 prompt, float32, mean relative key error over the 24 layers: rank 16: 0.29 after RoPE vs
0.057 before; rank 32: 0.14 vs 0.020; rank 48: 0.048 vs 0.007. Fit after RoPE, rank 32 answered ``4.`` for
``4616400`` (0/8 samples; RULER-4k on an H200: 0-9 where full scores 78); fit before RoPE it answers. Values
(no RoPE) lose 0.19 at rank 16, 0.09 at 32, 0.04 at 48, and alone (full keys) still answered at rank 16.
Each token's position is stored with it (int32, 4 bytes per token and KV head). After the fix, bf16, CPU, RULER-4k
niah_single_1, 8 samples in one left-padded batch: ranks 32 and 48 answer 8/8 as full does (rank 32: 0/8 before, 0.52
of full's bytes); rank 16 (0.27 of full's bytes) answers 0/8, still
misses (one sample at batch 1: ``4612`` for ``4616400``, key error 0.06 but value error 0.19 per layer).

Each token is stored as ``rank`` key and ``rank`` value coefficients in the model's dtype (or, with ``bits=4``
or ``bits=8``, as per-token integer codes with one fp16 scale and zero point) and its position; attention
reconstructs keys and values (coefficients times basis, keys turned to their position) for the layer that
attends. Tokens decoded later, and prompt chunks after the first, are projected onto that prefill basis. Bytes
held: per (sequence, KV head), ``2 x rank`` coefficients per token (plus their scales with ``bits=``), its
position, and the two ``head_dim x rank`` bases.

A storage format: it comes last, after any evictor (``snapkv+lowrank(rank=16)``: the basis is computed from
the tokens the evictor kept, at the positions recorded before it acted, see :func:`newest_positions`). A quantizer
after it is refused: it would quantize full rows, which lowrank no longer holds; ``bits=`` quantizes the
coefficients themselves. The paged engine refuses it (its pages hold full rows).

With ``bits=``, one scale per token is set by its largest coefficient, and the first components carry most of
the variance (uncentred keys: the first is near the mean key), so raw coefficients quantized that way round the
small components to their zero point: RULER-4k on an H200, niah_single_1..3, rank 32 at ``bits=4`` scored 40.0
where full scored 100 (rank 48: 36.7). So each basis column is scaled by the square root of its component's RMS
over the prefill's tokens (:func:`scaled_basis`; free: the scales are the basis' column norms). Measured on
Qwen2.5-Coder-0.5B, float32, CPU, a 1536-token essay prompt, relative key error (before RoPE) per layer, mean over
24 layers: rank 32 unquantized 0.079; at ``bits=4`` 0.137 unscaled, 0.115 scaled by the full RMS, 0.087 by its
square root (rank 48, ``bits=4``: 0.139, 0.093, 0.051). Values (truncation-dominated on that prompt) 0.416 ->
0.413 at rank 32. RULER-2k, CPU, float32, niah_single_1,2, 4 samples each, query-agnostic: rank 32 at ``bits=4``
7/8 before (``44999934``), 8/8 after, as full and unquantized rank 32; rank 48 at ``bits=4`` 4/8 before
(``44999999``, ``8180st09``), 8/8 after. Bytes are unchanged: per token and KV head,
``2 x (rank/2 + 4) + 4`` (44 at rank 32, 0.17 of bf16 full rows' 256).

The relative reconstruction error (Frobenius) of the prefill's keys (before RoPE) and values is recorded per
layer in ``state["reconstruction_error"]`` and reported by ``kvslim.Cache.stats()``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..cache.layer import LayerKV
from ..cache.quantized import TokenGroups, merge_order
from ..cache.segments import DenseSegment, Segment, ragged_to_padded
from ..shape import KVShape
from .base import Method, Observation
from .quantizers import SCALE_BYTES
from .registry import register


def rotate(rows: Tensor, positions: Tensor, rope: Tensor | None, sign: int = 1) -> Tensor:
    """(B,H,T,D) float32 ``rows`` turned by RoPE to their (B,H,T) ``positions`` (``sign=-1``: turned back), in
    Hugging Face's half-split layout over the first ``2 * len(rope)`` channels; as they are where ``rope`` is None.

    Any rotation undoes itself exactly, so stored keys come back as the model's whatever the positions; right
    positions only make the turned-back keys low-rank (see the module docstring).
    """
    rows = rows.float()
    if rope is None:
        return rows
    half = rope.shape[0]
    angle = positions.unsqueeze(-1).float() * rope.to(rows.device)
    cos, sin = angle.cos(), angle.sin() * sign
    first, second, rest = rows[..., :half], rows[..., half:2 * half], rows[..., 2 * half:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin, rest], -1)


def principal_basis(rows: Tensor, valid: Tensor, rank: int) -> Tensor:
    """(B,H,D,rank) orthonormal basis of the top-``rank`` directions of ``rows`` (B,H,T,D) where ``valid``.

    Eigenvectors of the float32 Gram matrix (D x D), so the basis is complete even when a head holds fewer
    than ``rank`` tokens.
    """
    x = rows.float() * valid.unsqueeze(-1)
    _, vectors = torch.linalg.eigh(x.transpose(-1, -2) @ x)  # ascending eigenvalues
    return vectors.flip(-1)[..., :rank].contiguous()


def scaled_basis(rows: Tensor, valid: Tensor, basis: Tensor) -> Tensor:
    """(B,H,D,R) ``basis`` with each column scaled by the square root of its coefficient's root-mean-square over
    the ``valid`` rows of (B,H,T,D), which narrows the spread of the stored coefficients to its square root.

    Why: ``bits=`` quantizes each token's coefficients with one scale, set by the largest, and the first components
    carry most of the variance, so unscaled the small ones round to their zero point. Scaled by the full RMS (every
    component unit-spread) a token unlike the prompt (the appended question) has its rare components magnified
    until they set its scale: that answered ``7680st`` for ``7685024`` where unscaled and square-root-scaled
    answered; the square root also measured lower key errors (module docstring). The scales cost no bytes: they are
    the basis' column norms, which the projection divides by (:meth:`LowRankSegment.project`). A component no
    valid row reaches keeps norm 1.
    """
    coef = (rows.float() @ basis) * valid.unsqueeze(-1)
    rms = (coef.square().sum(-2) / valid.sum(-1, keepdim=True).clamp(min=1)).sqrt()  # (B,H,R)
    return basis * torch.where(rms > 0, rms.sqrt(), torch.ones_like(rms)).unsqueeze(-2)


#: each stored token's RoPE position (int32), which its key is turned by when read
POSITION_BYTES = 4

#: a segment's coefficient rows (N, rank): in the model's dtype, or per-token integer codes (``bits=``)
Coefficients = Tensor | TokenGroups


def _decode(coef: Coefficients) -> Tensor:
    return coef.decode() if isinstance(coef, TokenGroups) else coef.float()


def _take(coef: Coefficients, rows: Tensor) -> Coefficients:
    return coef.take(rows) if isinstance(coef, TokenGroups) else coef[rows]


def _concat(older: Coefficients, newer: Coefficients, heads: Tensor, newer_heads: Tensor) -> Coefficients:
    if isinstance(older, TokenGroups):
        return older.concat(newer, heads, newer_heads)  # type: ignore[arg-type]
    return torch.cat([older, newer])[merge_order(heads, newer_heads)]  # type: ignore[list-item]


class LowRankSegment(Segment):
    """Key and value coefficients and each token's RoPE position (rows ordered by sequence, head, token; ``rank``
    coefficients each), per-head bases, and the RoPE frequencies the keys' basis was fit under (None: no RoPE)."""

    def __init__(self, key_coef: Coefficients, value_coef: Coefficients, positions: Tensor, lengths: Tensor,
                 key_basis: Tensor, value_basis: Tensor, rope: Tensor | None):
        self.key_coef, self.value_coef, self.positions, self.lengths = key_coef, value_coef, positions, lengths
        self.key_basis, self.value_basis, self.rope = key_basis, value_basis, rope

    @classmethod
    def project(cls, keys: Tensor, values: Tensor, positions: Tensor, valid: Tensor, key_basis: Tensor,
                value_basis: Tensor, rope: Tensor | None, bits: int | None) -> LowRankSegment:
        """Store the ``valid`` rows of (B,H,T,D) keys (turned back to position 0 by ``rope``) and values as
        coefficients on the (B,H,D,R) bases, in the model's dtype or (``bits``) as per-token codes with one fp16
        scale and zero point per token; ``positions`` (B,H,T) are each token's RoPE position."""
        coefs = []
        for rows, basis in ((rotate(keys, positions, rope, -1), key_basis), (values.float(), value_basis)):
            basis = basis.float()  # columns scaled (:func:`scaled_basis`): coefficients divide by their norm
            coef = ((rows @ basis) / basis.square().sum(-2, keepdim=True))[valid]
            coefs.append(coef.to(values.dtype) if bits is None else TokenGroups.encode(coef, bits, coef.shape[-1]))
        return cls(*coefs, positions[valid].to(torch.int32), valid.sum(-1), key_basis, value_basis, rope)

    def dense(self) -> tuple[Tensor, Tensor, Tensor]:
        key_coef, valid = ragged_to_padded(_decode(self.key_coef), self.lengths)
        value_coef, _ = ragged_to_padded(_decode(self.value_coef), self.lengths)
        positions, _ = ragged_to_padded(self.positions, self.lengths)
        keys = rotate(key_coef @ self.key_basis.float().transpose(-1, -2), positions, self.rope)
        values = value_coef @ self.value_basis.float().transpose(-1, -2)
        return keys.to(self.key_basis.dtype), values.to(self.value_basis.dtype), valid

    def select(self, keep: Tensor) -> LowRankSegment:
        index, valid = ragged_to_padded(torch.arange(self.tokens, device=self.lengths.device), self.lengths)
        mask = keep & valid
        rows = index[mask]
        return LowRankSegment(_take(self.key_coef, rows), _take(self.value_coef, rows), self.positions[rows],
                              mask.sum(-1), self.key_basis, self.value_basis, self.rope)

    def concat(self, newer: LowRankSegment) -> LowRankSegment:
        """This segment's tokens followed, per (sequence, head), by ``newer``'s (same bases)."""
        heads, newer_heads = (torch.repeat_interleave(torch.arange(s.lengths.numel(), device=s.lengths.device),
                                                      s.lengths.flatten()) for s in (self, newer))
        positions = torch.cat([self.positions, newer.positions])[merge_order(heads, newer_heads)]
        return LowRankSegment(_concat(self.key_coef, newer.key_coef, heads, newer_heads),
                              _concat(self.value_coef, newer.value_coef, heads, newer_heads), positions,
                              self.lengths + newer.lengths, self.key_basis, self.value_basis, self.rope)

    def nbytes(self) -> int:
        coefs = sum(c.nbytes() if isinstance(c, TokenGroups) else c.numel() * c.element_size()
                    for c in (self.key_coef, self.value_coef))
        return coefs + sum(t.numel() * t.element_size() for t in (self.positions, self.key_basis, self.value_basis))


@register
@dataclass
class LowRank(Method):
    """Store every held token as ``rank`` key and ``rank`` value coefficients on a per-head prefill basis."""

    rank: int = 32
    #: None: coefficients in the model's dtype; 4 or 8: per-token asymmetric integer codes over the ``rank``
    #: coefficients, one fp16 scale and zero point per token (as ``int8``/``int4`` store full rows), each
    #: component first divided by the square root of its RMS over the prefill (:func:`scaled_basis`)
    bits: int | None = None
    name = "lowrank"
    summary = ("keys and values stored as rank-R coefficients on each head's own prefill basis (SVD of the prompt's "
               "keys/values, no calibration), reconstructed at attention; bits=4|8 quantizes the coefficients "
               "(per token, on a basis scaled by each component's spread); HF path only")
    paper = ("after Palu (Chang et al. 2024, arXiv:2407.21118) and Eigen Attention (Saxena et al. 2024, "
             "arXiv:2408.05646), calibration-free")

    def validate(self) -> None:
        if self.rank < 1:
            raise ValueError(f"{self.name}: rank={self.rank} must be a positive number of coefficients per token, "
                             "at most head_dim")
        if self.bits not in (None, 4, 8):
            raise ValueError(f"{self.name}: bits={self.bits} must be None (coefficients in the model dtype), 4 or 8")
        if self.bits == 4 and self.rank % 2:
            raise ValueError(f"{self.name}: bits=4 packs two coefficients to a byte, so rank={self.rank} must be even")

    def check_hybrid(self, parts: list[Method], position: int) -> None:
        if position != len(parts) - 1:
            raise ValueError(f"{'+'.join(p.name for p in parts)}: {self.name} stores what the other parts keep as "
                             "low-rank coefficients, so it comes last and takes no quantizer after it: write e.g. "
                             f"'snapkv+{self.name}'")

    def on_prefill(self, obs: Observation) -> None:
        self.store(obs.layer, obs.rope)

    def on_decode(self, obs: Observation) -> None:
        self.store(obs.layer, obs.rope)

    def before_prefill(self, obs: Observation) -> None:
        """In a hybrid, record every held token's position before the evictor keeps some (see :meth:`store`)."""
        layer = obs.layer
        dense = iter(newest_positions(layer, [s for s in layer.segments if isinstance(s, DenseSegment)]))
        layer.state["positions"] = torch.cat([next(dense) if isinstance(s, DenseSegment) else
                                              ragged_to_padded(s.positions, s.lengths)[0]  # type: ignore[attr-defined]
                                              for s in layer.segments], -1)

    def store(self, layer: LayerKV, rope: Tensor | None) -> None:
        """Project every full-precision token onto the layer's bases (computed from what it holds, the first time)."""
        dense = [s for s in layer.segments if isinstance(s, DenseSegment)]
        if not dense:
            return
        recorded = layer.state.pop("positions", None)  # a hybrid's (before_prefill): what the evictor kept
        if recorded is None:
            positions = newest_positions(layer, dense)
        else:
            split = recorded.split(layer.widths(), -1)
            positions = [p for p, s in zip(split, layer.segments) if isinstance(s, DenseSegment)]
        if "lowrank" not in layer.state:
            keys, values, valid = layer.dense(dense[0].keys.dtype)
            if self.rank > min(keys.shape[-1], values.shape[-1]):
                raise ValueError(f"{self.name}: rank={self.rank} must be at most head_dim={keys.shape[-1]}")
            unturned = rotate(keys, torch.cat(positions, -1), rope, -1)  # nothing is stored yet: all dense
            # the bases are stored in the model's dtype, as the coefficients
            bases = principal_basis(unturned, valid, self.rank), principal_basis(values, valid, self.rank)
            layer.state["reconstruction_error"] = {"keys": _error(unturned, valid, bases[0]),
                                                   "values": _error(values, valid, bases[1])}
            # the bases are stored in the model's dtype, as the coefficients
            layer.state["lowrank"] = (scaled_basis(unturned, valid, bases[0]).to(keys.dtype),
                                      scaled_basis(values, valid, bases[1]).to(values.dtype))
        key_basis, value_basis = layer.state["lowrank"]
        stored: list[Segment] = []
        for seg in layer.segments:
            if isinstance(seg, DenseSegment):
                keys, values, valid = seg.dense()
                seg = LowRankSegment.project(keys, values, positions.pop(0), valid, key_basis, value_basis, rope,
                                             self.bits)
            if stored and isinstance(seg, LowRankSegment) and isinstance(stored[-1], LowRankSegment):
                seg = stored.pop().concat(seg)
            stored.append(seg)
        layer.replace(stored)

    def storage_bytes(self, shape: KVShape, tokens: list[float]) -> int:
        if self.bits is None:
            per_token = self.rank * shape.element_bytes
        else:
            per_token = self.rank * self.bits // 8 + 2 * SCALE_BYTES
        coefficients = sum(tokens) * (2 * per_token + POSITION_BYTES)
        bases = len(tokens) * 2 * shape.head_dim * self.rank * shape.element_bytes
        return int(round((coefficients + bases) * shape.num_kv_heads))


def newest_positions(layer: LayerKV, dense: list[DenseSegment]) -> list[Tensor]:
    """(B,H,T) RoPE positions of each of the layer's ``dense`` segments' tokens: the newest tokens each sequence
    has seen (real prompt and appended tokens plus decoding steps, batch padding not counted), in time order.

    Right whenever the full-precision tokens are the newest ones with no gap: lowrank alone, every step (its
    earlier tokens are stored with their positions), and a hybrid's decoding steps (the evictor keeps the newest
    token). An evictor before it (``snapkv+lowrank``) leaves gaps in the prompt it stores: there the positions are
    recorded before it acts (:meth:`LowRank.before_prefill`). Read off ranks instead, snapkv(keep=0.25)+lowrank
    on RULER-4k had rank-32 key errors of 0.15 (as fit after RoPE) and lost the needle.
    """
    valid = torch.cat([s.valid_mask() for s in dense], -1)
    seen = layer.state["real"] + layer.state.get("decoded", 0)  # (B,)
    rank = valid.long().cumsum(-1) - 1
    positions = seen[:, None, None] - valid.sum(-1, keepdim=True) + rank
    return list(positions.split([s.longest for s in dense], -1))


def _error(rows: Tensor, valid: Tensor, basis: Tensor) -> float:
    """Relative Frobenius error of projecting the ``valid`` rows of (B,H,T,D) onto (B,H,D,R) ``basis`` and back."""
    x, basis = rows.float() * valid.unsqueeze(-1), basis.float()
    residual = x - x @ basis @ basis.transpose(-1, -2)
    norm = float(x.norm())
    return float(residual.norm()) / norm if norm else 0.0
