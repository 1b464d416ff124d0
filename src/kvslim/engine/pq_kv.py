"""PQCache in the engine: key codes in device pages, exact keys and values in host pages of the same block tables.

The method object is the Hugging Face path's (:class:`kvslim.methods.pqcache.PQCache`) and so is every
step of its rule, from :mod:`kvslim.cache.pq` and :mod:`kvslim.cache.offload`: codebooks by the same
seeded k-means (:func:`kmeans`) on the same tokens, codes by :func:`code_keys`, approximate scores by
:func:`approximate_logits`, the top k per KV head by :func:`top_per_kv_head`, their exact keys and values
fetched by :func:`fetch_rows`, exact attention over them merged with the whole local window.

Layout. ``codes`` (L, blocks, block_size, H, m) uint8 on the device; ``kv_host`` (L, blocks, block_size, H, 2D)
holds each token's key and value side by side in host memory (pinned when CUDA is available), so a step
gathers both in one copy. Every token has its slot from the start (as under KCache, the pool grows one slot
per step), but a slot's code and host row are written only when the token leaves the window.

The window. The newest tokens' exact keys and values wait on the device in the sequence's row of a ring
(L, rows, max(2 * window, 1), H, D); the row also holds the sequence's codebooks (L, H, m, 2**bits, D/m).
After the prefill a head keeps its last ``window`` tokens there; when a layer's ring fills, each head codes
and offloads all but its newest ``window`` (one transfer per ``window`` steps). Codebooks are trained once
per layer and sequence, on the first tokens that leave the window (the prompt's, unless it fits in the
window). Tokens therefore equal the Hugging Face path's step for step, except after a preemption (the
re-prefill codes the old window too) and when heads of one sequence hold different numbers of tokens
(AdaKV) *and* a layer's codebooks are trained at a flush rather than at the prefill: that path lays the
window out with gaps, so k-means draws its seeded starting tokens at other positions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..cache.offload import TopN, attend_selected, fetch_rows, top_per_kv_head
from ..cache.pq import approximate_logits, code_keys, kmeans, split_subspaces
from ..cache.segments import group_rows, grouped_logits, merge_partials, partial_attention
from ..methods.pqcache import PQCache
from .kv_store import heads_expand, ring_rows
from .offload_kv import flat_slots, host_pages
from .sequence import Sequence


@dataclass
class PQStep:
    """What one decode step of :class:`PQCacheKV` reads, and the layers whose window is offloaded after it."""

    rows: Tensor  # (B,) ring row of each sequence
    tail: Tensor  # (B, L, H) ring position of the new token = window tokens already held
    flush: tuple[Tensor, Tensor, Tensor, Tensor] | None  # (F,) ring row and layer, (F, C, H) flat slots and leaving mask


class PQCacheKV:
    """Codes on the device, exact keys and values on the host, the window in a device ring (see the module docstring)."""

    quantized = False
    ring = True
    #: the rows may take most of ``kv_memory``: window and codebooks *are* PQCache's device cache, while its pages
    #: hold a byte per sub-space and token (the quarter other stores leave their rows would waste the budget)
    ring_share = 0.9
    graphable = False  # as KCache's: the top-k width and, on the staged path, the rows go through the host

    def __init__(self, method: PQCache, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        if head_dim % method.m:
            raise ValueError(f"{method.spec}: m={method.m} must divide the head dimension {head_dim}")
        self.method, self.top = method, TopN(method.k, method.fraction)
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.m, self.clusters, self.window = method.m, 2**method.bits, method.window
        self.capacity = max(2 * self.window, 1)
        element = torch.empty((), dtype=dtype).element_size()
        per_layer = num_kv_heads * head_dim * element * (2 * self.capacity + self.clusters)  # ring K, V and centroids
        self.row_bytes = num_layers * per_layer
        self.block_size = 0
        self.codes = self.kv_host = self.ring_k = self.ring_v = self.centroids = torch.empty(0)
        self.trained = torch.zeros(0, dtype=torch.bool)  # (L, rows): codebooks exist for this layer and ring row
        #: bytes copied host→device (selected keys and values) and device→host (offloaded ones) so far
        self.h2d_bytes = self.d2h_bytes = 0

    def block_bytes(self, block_size: int) -> int:
        """Device bytes of a block: one byte per sub-space, token, KV head and layer."""
        return self.num_layers * block_size * self.num_kv_heads * self.m

    def host_block_bytes(self, block_size: int) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * block_size * self.num_kv_heads * 2 * self.head_dim * element

    def default_block_size(self) -> int:
        return 16

    def rows_for(self, budget: int, max_num_seqs: int) -> int:
        what = f"{self.method.spec} keeps up to {self.capacity} newest tokens and the codebooks per sequence on the device"
        return ring_rows(budget, max_num_seqs, self.row_bytes, self.ring_share, what)

    def allocate(self, num_blocks: int, block_size: int, rows: int) -> None:
        heads, dim = self.num_kv_heads, self.head_dim
        self.codes = torch.zeros((self.num_layers, num_blocks, block_size, heads, self.m), dtype=torch.uint8,
                                 device=self.device)
        self.kv_host = host_pages((self.num_layers, num_blocks, block_size, heads, 2 * dim), self.dtype, self.method.spec)
        ring = (self.num_layers, rows, self.capacity, heads, dim)
        self.ring_k = torch.zeros(ring, dtype=self.dtype, device=self.device)
        self.ring_v = torch.zeros(ring, dtype=self.dtype, device=self.device)
        self.centroids = torch.zeros((self.num_layers, rows, heads, self.m, self.clusters, dim // self.m), dtype=self.dtype,
                                     device=self.device)
        self.trained = torch.zeros((self.num_layers, rows), dtype=torch.bool)
        self.block_size = block_size

    def copy_blocks(self, src: Tensor, dst: Tensor) -> None:
        self.codes[:, dst] = self.codes[:, src]
        self.kv_host[:, dst.cpu()] = self.kv_host[:, src.cpu()]

    def copy_row(self, src: int, dst: int) -> None:
        for t in (self.ring_k, self.ring_v, self.centroids, self.trained):
            t[:, dst] = t[:, src]

    def read(self, layer: int, slots: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(f"{self.method.spec}: prefix sharing is for the full model-dtype cache only")

    def _train(self, layer: int, row: int, keys: Tensor, keep: Tensor) -> None:
        """Codebooks of one layer and ring row from (H, T, D) keys where ``keep`` (H, T), exactly as PQSegment.build."""
        centroids = kmeans(split_subspaces(keys[None], self.m), keep[None], self.clusters, self.method.iterations,
                           self.method.seed)
        self.centroids[layer, row] = centroids[0].to(self.dtype)
        self.trained[layer, row] = True

    def _offload(self, layers: Tensor, slots: Tensor, heads: Tensor, codes: Tensor, keys: Tensor, values: Tensor) -> None:
        """Write N tokens' codes (N, m) to device pages and their keys|values (N, 2D) to host pages."""
        self.codes.view(self.num_layers, -1, self.num_kv_heads, self.m)[layers, slots, heads] = codes
        rows = torch.cat([keys, values.to(keys.dtype)], -1).cpu()
        host = self.kv_host.view(self.num_layers, -1, self.num_kv_heads, 2 * self.head_dim)
        host[layers.cpu(), slots.cpu(), heads.cpu()] = rows
        self.d2h_bytes += rows.numel() * rows.element_size()

    def store_prefill(self, layer: int, seq: Sequence, slots: Tensor, keys: Tensor, values: Tensor, lens: Tensor
                      ) -> tuple[Tensor, Tensor]:
        """Code and offload each head's tokens older than its last ``window``; those wait in the ring row."""
        heads, length = keys.shape[:2]
        t = torch.arange(length, device=self.device)
        coded = (lens - self.window).clamp(min=0)
        old = t < coded[:, None]
        grid, head = heads_expand(slots, heads)
        row = seq.ring_row
        self.trained[layer, row] = False
        if bool(old.any()):
            self._train(layer, row, keys, old)
            codes = code_keys(keys[None], self.centroids[layer, row][None])[0]
            self._offload(torch.full_like(grid[old], layer), grid[old], head[old], codes[old], keys[old], values[old])
        ring = (t >= coded[:, None]) & (t < lens[:, None])
        position = (t - coded[:, None]).expand(heads, -1)
        self.ring_k[layer, row, position[ring], head[ring]] = keys[ring]
        self.ring_v[layer, row, position[ring], head[ring]] = values[ring]
        return lens, lens - coded

    # -- decoding -----------------------------------------------------------------------------------
    def grows(self, seq: Sequence) -> bool:
        return True

    def _flushes(self, tail: Tensor) -> Tensor:
        """(..., L) layers whose ring is full once this step's token is in (the longest head decides, as on_decode)."""
        return (tail + 1).amax(-1) >= self.capacity

    def prepare(self, seqs: list[Sequence], tables: Tensor, held: Tensor) -> PQStep:
        """Ring positions, and for every (sequence, layer) whose ring fills: the slots its leaving tokens take."""
        tail = torch.stack([s.tail for s in seqs])  # type: ignore[misc]  # (B, L, H)
        rows = torch.tensor([s.ring_row for s in seqs])
        b, layer = self._flushes(tail).nonzero(as_tuple=True)
        flush = None
        if len(b):
            leaving = (tail[b, layer] + 1 - self.window).clamp(min=0)  # (F, H) tokens each head offloads
            newest = held[b, layer]  # (F, H) slot of this step's token
            position = torch.arange(self.capacity)[:, None]
            logical = torch.minimum(newest[:, None, :] - tail[b, layer][:, None, :] + position, newest[:, None, :])
            flush = (rows[b], layer, flat_slots(tables[b], logical, self.block_size), position < leaving[:, None, :])
        put = lambda x: x.to(self.device, non_blocking=True)  # noqa: E731
        return PQStep(put(rows), put(tail), flush)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, batch: Any, scale: float) -> Tensor:
        """Put the step's key and value in the ring, then: top k of the coded tokens (exact rows fetched) + the window."""
        step: PQStep = batch.kv
        heads = torch.arange(self.num_kv_heads, device=self.device).expand(len(q), -1)
        rows = step.rows[:, None].expand_as(heads)
        self.ring_k[layer][rows, step.tail[:, layer], heads] = k
        self.ring_v[layer][rows, step.tail[:, layer], heads] = v
        tables = batch.block_tables.clamp(min=0).long()
        query = q[:, :, None]  # (B, Hq, 1, D)
        group, dim = q.shape[1] // self.num_kv_heads, self.head_dim
        codes = self.codes[layer][tables].flatten(1, 2).transpose(1, 2)  # (B, H, T, m) in table order
        approximate = approximate_logits(query, self.centroids[layer][step.rows], codes, scale)
        coded = batch.lens[:, layer] - step.tail[:, layer]  # (B, H)
        columns = torch.arange(codes.shape[2], device=self.device)
        rows_allowed = group_rows((columns < coded[..., None])[:, :, None], group)
        index, kept = top_per_kv_head(approximate, rows_allowed, self.top(coded))
        head = torch.arange(self.num_kv_heads, device=self.device)[:, None]
        flat = flat_slots(tables, index, self.block_size) * self.num_kv_heads + head
        fetched = fetch_rows(self.kv_host[layer].view(-1, 2 * dim), flat, self.device).view(*index.shape, 2 * dim)
        self.h2d_bytes += fetched.numel() * fetched.element_size()
        logits = grouped_logits(query, fetched[..., :dim], scale)
        selected = attend_selected(query, logits, rows_allowed, index, kept, fetched[..., dim:])
        window = torch.arange(self.capacity, device=self.device) <= step.tail[:, layer, :, None]  # (B, H, C)
        local = partial_attention(query, self.ring_k[layer][step.rows].transpose(1, 2),
                                  self.ring_v[layer][step.rows].transpose(1, 2), window[:, :, None], scale)
        out, _ = merge_partials([selected, local])
        return out[:, :, 0].to(q.dtype)

    def finish(self, batch: Any) -> None:
        """Offload the leaving tokens of full rings (training codebooks first where none exist), shift the rest down."""
        step: PQStep = batch.kv
        if step.flush is None:
            return
        rows, layer, slots, leaving = step.flush
        at = (layer.to(self.device), rows.to(self.device))
        for i in (~self.trained[layer, rows]).nonzero().flatten().tolist():
            keys = self.ring_k[layer[i], rows[i]].transpose(0, 1)  # (H, C, D)
            self._train(int(layer[i]), int(rows[i]), keys, leaving[i].T.to(self.device))
        keys = self.ring_k[at].transpose(1, 2)  # (F, H, C, D)
        values = self.ring_v[at].transpose(1, 2)
        codes = code_keys(keys, self.centroids[at])  # (F, H, C, m)
        mask = leaving.transpose(1, 2).to(self.device)  # (F, H, C)
        layers = at[0][:, None, None].expand_as(mask)
        heads = torch.arange(self.num_kv_heads, device=self.device)[None, :, None].expand_as(mask)
        self._offload(layers[mask], slots.transpose(1, 2).to(self.device)[mask], heads[mask], codes[mask], keys[mask],
                      values[mask])
        shift = leaving.sum(1).to(self.device)  # (F, H) tokens each head offloaded
        source = (torch.arange(self.capacity, device=self.device)[None, :, None] + shift[:, None, :]).clamp(
            max=self.capacity - 1)  # (F, C, H)
        for ring in (self.ring_k, self.ring_v):
            window = ring[at]  # (F, C, H, D)
            ring[at] = window.gather(1, source[..., None].expand_as(window))

    def advance(self, seq: Sequence) -> None:
        tail = seq.tail + 1  # type: ignore[operator]
        flushed = self._flushes(seq.tail)[:, None]  # type: ignore[arg-type]
        seq.tail = torch.where(flushed, tail.clamp(max=self.window), tail)
        seq.kv_slots += 1
