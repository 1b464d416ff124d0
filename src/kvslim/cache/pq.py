"""Product-quantized keys for retrieval: codes on the device, exact keys and values in host memory.

Per (sequence, KV head), the key space is split into ``m`` sub-spaces of ``D / m`` channels and each
sub-space gets ``2**bits`` centroids by k-means. A key is then ``m`` small codes; ``q·k`` is
approximated by summing, over sub-spaces, the query's dot product with the coded centroid (a table
of ``m * 2**bits`` products per query, then lookups). That approximation only *ranks* tokens: the
top ones' exact keys and values are copied from the host and attended exactly.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .offload import TopN, attend_selected, concat_ragged, fetch_rows, kept_rows, row_index, to_host, top_per_kv_head
from .segments import Segment, group_rows, grouped_logits, ragged_to_padded


def split_subspaces(keys: Tensor, m: int) -> Tensor:
    """(B,H,T,D) keys as (B,H,m,T,D/m) float32 sub-vectors."""
    batch, heads, length, dim = keys.shape
    if dim % m:
        raise ValueError(f"pqcache: m={m} must divide the head dimension {dim}")
    return keys.float().view(batch, heads, length, m, dim // m).permute(0, 1, 3, 2, 4)


def nearest(x: Tensor, centroids: Tensor) -> Tensor:
    """Code (B,H,m,T) of the nearest centroid (B,H,m,C,d) for every sub-vector x (B,H,m,T,d)."""
    dist = centroids.square().sum(-1).unsqueeze(-2) - 2 * x @ centroids.transpose(-1, -2)  # |x|^2 is constant per row
    return dist.argmin(-1)


def kmeans(x: Tensor, valid: Tensor, clusters: int, iterations: int, seed: int) -> Tensor:
    """Centroids (B,H,m,C,d) of each (sequence, head, sub-space)'s valid sub-vectors x (B,H,m,T,d) by Lloyd's algorithm.

    Seeded initialisation from distinct held tokens (repeated when a row holds fewer than C), then a
    fixed number of iterations so the cost is known in advance; a cluster left empty keeps its centroid.
    """
    batch, heads, m, length, dim = x.shape
    generator = torch.Generator(device=x.device).manual_seed(seed)
    noise = torch.rand(valid.shape, generator=generator, device=x.device).masked_fill(~valid, 2.0)
    order = noise.argsort(-1)  # held tokens first, in random order
    count = valid.sum(-1, keepdim=True).clamp(min=1)
    pick = order.gather(-1, torch.arange(clusters, device=x.device) % count)  # (B, H, C)
    centroids = x.gather(3, pick[:, :, None, :, None].expand(batch, heads, m, clusters, dim))
    weight = valid[:, :, None, :].expand(batch, heads, m, length).float()
    for _ in range(iterations):
        codes = nearest(x, centroids)
        sums = torch.zeros_like(centroids).scatter_add_(3, codes.unsqueeze(-1).expand_as(x), x * weight.unsqueeze(-1))
        counts = torch.zeros(centroids.shape[:-1], device=x.device).scatter_add_(3, codes, weight)
        centroids = torch.where(counts.unsqueeze(-1) > 0, sums / counts.clamp(min=1).unsqueeze(-1), centroids)
    return centroids


def code_keys(keys: Tensor, centroids: Tensor) -> Tensor:
    """Codes (B,H,T,m) uint8 of (B,H,T,D) keys: the nearest of the centroids (B,H,m,C,D/m) as stored, per sub-space."""
    return nearest(split_subspaces(keys, centroids.shape[2]), centroids.float()).permute(0, 1, 3, 2).to(torch.uint8)


def approximate_logits(query: Tensor, centroids: Tensor, codes: Tensor, scaling: float) -> Tensor:
    """Scaled logits (B,H,G*q,T) of (B,Hq,q,D) queries from codes (B,H,T,m) and centroids (B,H,m,C,D/m):
    per sub-space query·centroid tables, looked up and summed."""
    batch, heads, m, clusters, sub = centroids.shape
    rows = query.float().reshape(batch, heads, -1, m, sub)
    table = torch.einsum("bhrmd,bhmcd->bhmrc", rows, centroids.float())  # (B, H, m, R, C)
    lookup = codes.long().permute(0, 1, 3, 2).unsqueeze(3).expand(-1, -1, -1, table.shape[3], -1)
    return table.gather(-1, lookup).sum(2) * scaling


class PQSegment(Segment):
    """PQCache storage: codes (rows, m) uint8 and centroids (B,H,m,C,D/m) on the device; exact K|V rows on the host.

    Keys and values are stored side by side in one host row, so a step gathers and copies them in one transfer.
    """

    def __init__(self, codes: Tensor, centroids: Tensor, kv: Tensor, key_dim: int, lengths: Tensor, top: TopN):
        self.codes, self.centroids, self.kv, self.key_dim = codes, centroids, kv, key_dim
        self.lengths, self.top = lengths, top

    @classmethod
    def build(cls, keys: Tensor, values: Tensor, keep: Tensor, m: int, bits: int, top: TopN, iterations: int,
              seed: int) -> "PQSegment":
        """Train codebooks on the tokens ``keep`` (B,H,T) of padded keys/values, then store those tokens."""
        if not 1 <= bits <= 8:
            raise ValueError(f"pqcache: bits={bits} must be in 1..8 (codes are stored one per byte)")
        centroids = kmeans(split_subspaces(keys, m), keep, 2**bits, iterations, seed).to(keys.dtype)
        batch, heads, _, dim = keys.shape
        empty = cls(torch.empty(0, m, dtype=torch.uint8, device=keys.device), centroids,
                    to_host(keys.new_empty(0, dim + values.shape[-1])), dim, keep.new_zeros(batch, heads, dtype=torch.long),
                    top)
        return empty.extend(keys, values, keep)

    def extend(self, keys: Tensor, values: Tensor, keep: Tensor) -> "PQSegment":
        """This segment plus the tokens ``keep`` of padded keys/values, after its own and coded with its codebooks."""
        codes = code_keys(keys, self.centroids)[keep]
        rows = torch.cat([keys[keep], values[keep].to(keys.dtype)], -1)
        lengths = keep.sum(-1)
        return PQSegment(concat_ragged(self.codes, self.lengths, codes, lengths), self.centroids,
                         concat_ragged(self.kv, self.lengths, to_host(rows), lengths), self.key_dim,
                         self.lengths + lengths, self.top)

    def dense(self) -> tuple[Tensor, Tensor, Tensor]:
        rows = fetch_rows(self.kv, torch.arange(self.kv.shape[0]), self.codes.device)
        kv, valid = ragged_to_padded(rows, self.lengths)
        return kv[..., : self.key_dim], kv[..., self.key_dim :], valid

    def select(self, keep: Tensor) -> "PQSegment":
        rows = kept_rows(self.lengths, keep)
        return PQSegment(self.codes[rows], self.centroids, to_host(self.kv[rows.to(self.kv.device)]), self.key_dim,
                         (keep & self.valid_mask()).sum(-1), self.top)

    def attend(self, query: Tensor, allowed: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
        batch, heads = self.lengths.shape
        rows_allowed = group_rows(allowed, query.shape[1] // heads)
        codes, _ = ragged_to_padded(self.codes, self.lengths)
        approximate = approximate_logits(query, self.centroids, codes, scaling)
        index, kept = top_per_kv_head(approximate, rows_allowed, self.top(self.lengths))
        fetched = fetch_rows(self.kv, row_index(self.lengths, index), self.codes.device)
        fetched = fetched.view(batch, heads, index.shape[-1], self.kv.shape[-1])
        logits = grouped_logits(query, fetched[..., : self.key_dim], scaling)
        return attend_selected(query, logits, rows_allowed, index, kept, fetched[..., self.key_dim :])

    def device_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.centroids))

    def host_nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def nbytes(self) -> int:
        return self.device_nbytes() + self.host_nbytes()
