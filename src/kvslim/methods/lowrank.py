"""Low-rank keys and values: each KV head stores rank-R coefficients plus its own basis instead of full rows.

After Palu (Chang et al. 2024, "Palu: Compressing KV-Cache with Low-Rank Projection", arXiv:2407.21118),
Eigen Attention (Saxena et al. 2024, arXiv:2408.05646) and ShadowKV's low-rank keys (Sun et al. 2024,
arXiv:2410.21465), but with no calibration data: at the first prefill, per layer, sequence and KV head, the
basis is the top-``rank`` eigenvectors of the Gram matrix ``X^T X`` of the keys held (and, separately, of the
values), i.e. the right singular vectors of the prompt's own keys/values. Uncentred, so a rank of ``head_dim``
is an orthonormal change of basis and reconstructs exactly (up to float rounding).

Each token is stored as ``rank`` key and ``rank`` value coefficients in the model's dtype; attention
reconstructs keys and values (coefficients times basis) for the layer that attends. Tokens decoded later, and
prompt chunks after the first, are projected onto that prefill basis. Bytes held: per (sequence, KV head),
``2 x rank`` coefficients per token plus the two ``head_dim x rank`` bases.

A storage format: it comes last, after any evictor (``snapkv+lowrank(rank=16)``: the basis is computed from
the tokens the evictor kept). The coefficients are not quantized (a quantizer after it is refused): the
saving is set by ``rank / head_dim`` alone. The paged engine refuses it (its pages hold full rows).
The relative reconstruction error (Frobenius) of the prefill's keys and values is recorded per layer in
``state["reconstruction_error"]`` and reported by ``kvslim.Cache.stats()``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..cache.layer import LayerKV
from ..cache.segments import DenseSegment, Segment, ragged_to_padded
from ..shape import KVShape
from .base import Method, Observation
from .registry import register


def principal_basis(rows: Tensor, valid: Tensor, rank: int) -> Tensor:
    """(B,H,D,rank) orthonormal basis of the top-``rank`` directions of ``rows`` (B,H,T,D) where ``valid``.

    Eigenvectors of the float32 Gram matrix (D x D), so the basis is complete even when a head holds fewer
    than ``rank`` tokens.
    """
    x = rows.float() * valid.unsqueeze(-1)
    _, vectors = torch.linalg.eigh(x.transpose(-1, -2) @ x)  # ascending eigenvalues
    return vectors.flip(-1)[..., :rank].contiguous()


class LowRankSegment(Segment):
    """Key and value coefficients (rows ordered by sequence, head, token; ``rank`` each) and per-head bases."""

    def __init__(self, key_coef: Tensor, value_coef: Tensor, lengths: Tensor, key_basis: Tensor, value_basis: Tensor):
        self.key_coef, self.value_coef, self.lengths = key_coef, value_coef, lengths
        self.key_basis, self.value_basis = key_basis, value_basis

    @classmethod
    def project(cls, keys: Tensor, values: Tensor, valid: Tensor, key_basis: Tensor,
                value_basis: Tensor) -> "LowRankSegment":
        """Store the ``valid`` rows of (B,H,T,D) keys/values as coefficients on the (B,H,D,R) bases."""
        key_coef = (keys.float() @ key_basis.float()).to(keys.dtype)
        value_coef = (values.float() @ value_basis.float()).to(values.dtype)
        return cls(key_coef[valid], value_coef[valid], valid.sum(-1), key_basis, value_basis)

    def coefficients(self) -> tuple[Tensor, Tensor, Tensor]:
        key_coef, valid = ragged_to_padded(self.key_coef, self.lengths)
        return key_coef, ragged_to_padded(self.value_coef, self.lengths)[0], valid

    def dense(self) -> tuple[Tensor, Tensor, Tensor]:
        key_coef, value_coef, valid = self.coefficients()
        keys = (key_coef.float() @ self.key_basis.float().transpose(-1, -2)).to(key_coef.dtype)
        values = (value_coef.float() @ self.value_basis.float().transpose(-1, -2)).to(value_coef.dtype)
        return keys, values, valid

    def select(self, keep: Tensor) -> "LowRankSegment":
        key_coef, value_coef, valid = self.coefficients()
        mask = keep & valid
        return LowRankSegment(key_coef[mask], value_coef[mask], mask.sum(-1), self.key_basis, self.value_basis)

    def concat(self, newer: "LowRankSegment") -> "LowRankSegment":
        """This segment's tokens followed, per (sequence, head), by ``newer``'s (same bases)."""
        old_k, old_v, old_valid = self.coefficients()
        new_k, new_v, new_valid = newer.coefficients()
        valid = torch.cat([old_valid, new_valid], -1)
        keys, values = torch.cat([old_k, new_k], 2)[valid], torch.cat([old_v, new_v], 2)[valid]
        return LowRankSegment(keys, values, valid.sum(-1), self.key_basis, self.value_basis)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self.key_coef, self.value_coef, self.key_basis, self.value_basis))


@register
@dataclass
class LowRank(Method):
    """Store every held token as ``rank`` key and ``rank`` value coefficients on a per-head prefill basis."""

    rank: int = 32
    name = "lowrank"
    summary = ("keys and values stored as rank-R coefficients on each head's own prefill basis (SVD of the prompt's "
               "keys/values, no calibration), reconstructed at attention; HF path only")
    paper = ("after Palu (Chang et al. 2024, arXiv:2407.21118) and Eigen Attention (Saxena et al. 2024, "
             "arXiv:2408.05646), calibration-free")

    def validate(self) -> None:
        if self.rank < 1:
            raise ValueError(f"{self.name}: rank={self.rank} must be a positive number of coefficients per token, "
                             "at most head_dim")

    def check_hybrid(self, parts: list[Method], position: int) -> None:
        if position != len(parts) - 1:
            raise ValueError(f"{'+'.join(p.name for p in parts)}: {self.name} stores what the other parts keep as "
                             "low-rank coefficients, so it comes last and takes no quantizer after it: write e.g. "
                             f"'snapkv+{self.name}'")

    def on_prefill(self, obs: Observation) -> None:
        self.store(obs.layer)

    def on_decode(self, obs: Observation) -> None:
        self.store(obs.layer)

    def store(self, layer: LayerKV) -> None:
        """Project every full-precision token onto the layer's bases (computed from what it holds, the first time)."""
        dense = [s for s in layer.segments if isinstance(s, DenseSegment)]
        if not dense:
            return
        if "lowrank" not in layer.state:
            keys, values, valid = layer.dense(dense[0].keys.dtype)
            if self.rank > min(keys.shape[-1], values.shape[-1]):
                raise ValueError(f"{self.name}: rank={self.rank} must be at most head_dim={keys.shape[-1]}")
            # the bases are stored in the model's dtype, as the coefficients
            layer.state["lowrank"] = bases = (principal_basis(keys, valid, self.rank).to(keys.dtype),
                                              principal_basis(values, valid, self.rank).to(values.dtype))
            layer.state["reconstruction_error"] = {"keys": _error(keys, valid, bases[0]),
                                                   "values": _error(values, valid, bases[1])}
        key_basis, value_basis = layer.state["lowrank"]
        stored: list[Segment] = []
        for seg in layer.segments:
            if isinstance(seg, DenseSegment):
                keys, values, valid = seg.dense()
                seg = LowRankSegment.project(keys, values, valid, key_basis, value_basis)
            if stored and isinstance(seg, LowRankSegment) and isinstance(stored[-1], LowRankSegment):
                seg = stored.pop().concat(seg)
            stored.append(seg)
        layer.replace(stored)

    def storage_bytes(self, shape: KVShape, tokens: list[float]) -> int:
        coefficients = sum(tokens) * 2 * self.rank * shape.element_bytes
        bases = len(tokens) * 2 * shape.head_dim * self.rank * shape.element_bytes
        return int(round((coefficients + bases) * shape.num_kv_heads))


def _error(rows: Tensor, valid: Tensor, basis: Tensor) -> float:
    """Relative Frobenius error of projecting the ``valid`` rows of (B,H,T,D) onto (B,H,D,R) ``basis`` and back."""
    x = rows.float() * valid.unsqueeze(-1)
    residual = x - x @ basis @ basis.transpose(-1, -2)
    norm = float(x.norm())
    return float(residual.norm()) / norm if norm else 0.0
