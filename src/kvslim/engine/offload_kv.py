"""KCache in the engine: keys in device pages, values in host pages of the same block tables.

The method object is the Hugging Face path's (:class:`kvslim.methods.kcache.KCache`) and so is its
rule, from :mod:`kvslim.cache.offload`: at each decode step, exact q·K over a sequence's offloaded
tokens, the top N per KV head by :func:`top_per_kv_head` (N from the same :class:`TopN`), only those
value rows copied host→device (:func:`fetch_rows`), softmax over them (:func:`attend_selected`),
merged by log-sum-exp with the whole attention over the newest tokens. The first ``full_layers``
layers keep their values in device pages and attend whole, as in the paper.

Layout. ``k_cache`` (L, blocks, block_size, H, D) on the device; ``v_cache`` the same for the first
``full_layers`` layers only; ``v_host`` (L - full_layers, blocks, block_size, H, D) in host memory
(pinned when CUDA is available), indexed by the same flat slots, so one block table addresses a
token's key on the device and its value on the host. ``kv_memory`` pays for device bytes only; the
host pool mirrors the device pool's block count.

The newest tokens. As under ``kvslim.Cache``, a decoded token's value stays on the device until
``recent`` of them have accumulated, then they move to the host together (one transfer per
``recent`` steps, not one per token). Here they wait in the sequence's row of a device *ring*
(L - full_layers, rows, recent, H, D) (the row machinery of :class:`QuantKV`); ``seq.tail`` counts
them. Their keys are in the pages from the start, so a flush moves values only. Top N is taken over
the offloaded tokens (slots before the tail); the tail is always attended whole. Tokens therefore
equal the Hugging Face path's step for step. After a preemption the re-prefill offloads the old tail
as well, which that path never does, so a preempted sequence may pick different tokens from then on.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..cache.offload import TopN, attend_selected, fetch_rows, to_host, top_per_kv_head
from ..cache.segments import group_rows, grouped_logits, merge_partials, softmax_partial
from ..methods.kcache import KCache
from .kv_store import DenseKV, ring_rows, write_heads
from .sequence import Sequence


def host_pages(shape: tuple[int, ...], dtype: torch.dtype, what: str) -> Tensor:
    """Zeroed host pages (pinned when CUDA is available); a clear error instead of swapping the host out."""
    need = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > 0.9 * free:
        raise ValueError(f"{what}: the host pages mirror the device blocks and need {need / 2**30:.1f} GiB, more than 90% "
                         f"of the free host memory ({free / 2**30:.1f} GiB): lower kv_memory")
    return to_host(torch.zeros(shape, dtype=dtype))


def flat_slots(tables: Tensor, logical: Tensor, block_size: int) -> Tensor:
    """Flat pool slots of per-sequence logical slots ``logical`` (B, ...) through block tables (B, M)."""
    block = tables.long().gather(1, (logical // block_size).flatten(1)).view_as(logical)
    return block * block_size + logical % block_size


@dataclass
class KCacheStep:
    """What one decode step of :class:`KCacheKV` reads, and the flushes to run after it."""

    slots: Tensor  # (B, L, H) flat page slot of the new token's key
    rows: Tensor  # (B,) ring row of each sequence
    tail: Tensor  # (B,) ring position of the new token = newest tokens already in the ring
    flush: tuple[Tensor, Tensor] | None  # host flat slots (F, L', recent, H) and ring rows (F,) of the F full rings


class KCacheKV(DenseKV):
    """Keys on the device, values of layers ``>= full_layers`` on the host (see the module docstring)."""

    ring = True
    #: the step's top-N width is read on the host, and without zero-copy the row numbers too: no CUDA graph
    graphable = False

    def __init__(self, method: KCache, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        super().__init__(num_layers, num_kv_heads, head_dim, dtype, device)
        self.method, self.top, self.recent = method, TopN(method.n, method.fraction), method.recent
        self.full_layers = min(method.full_layers, num_layers)
        self.offloaded_layers = num_layers - self.full_layers
        self.token_bytes = num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
        self.row_bytes = self.offloaded_layers * self.recent * self.token_bytes
        self.v_host = self.ring_v = torch.empty(0)
        #: bytes copied host→device (selected values) and device→host (flushed values) so far
        self.h2d_bytes = self.d2h_bytes = 0

    def block_bytes(self, block_size: int) -> int:
        """Device bytes of a block: every layer's keys, and the values of the first ``full_layers``."""
        return (self.num_layers + self.full_layers) * block_size * self.token_bytes

    def host_block_bytes(self, block_size: int) -> int:
        return self.offloaded_layers * block_size * self.token_bytes

    def rows_for(self, budget: int, max_num_seqs: int) -> int:
        what = f"{self.method.spec} keeps the values of up to {self.recent} newest tokens per sequence on the device"
        return ring_rows(budget, max_num_seqs, self.row_bytes, self.ring_share, what)

    def allocate(self, num_blocks: int, block_size: int, rows: int) -> None:
        pages = lambda layers: (layers, num_blocks, block_size, self.num_kv_heads, self.head_dim)  # noqa: E731
        self.k_cache = torch.zeros(pages(self.num_layers), dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(pages(self.full_layers), dtype=self.dtype, device=self.device)
        self.v_host = host_pages(pages(self.offloaded_layers), self.dtype, self.method.spec)
        ring = (self.offloaded_layers, rows, self.recent, self.num_kv_heads, self.head_dim)
        self.ring_v = torch.zeros(ring, dtype=self.dtype, device=self.device)
        self.block_size = block_size

    def copy_blocks(self, src: Tensor, dst: Tensor) -> None:
        self.k_cache[:, dst] = self.k_cache[:, src]
        self.v_cache[:, dst] = self.v_cache[:, src]
        self.v_host[:, dst.cpu()] = self.v_host[:, src.cpu()]

    def copy_row(self, src: int, dst: int) -> None:
        self.ring_v[:, dst] = self.ring_v[:, src]

    def read(self, layer: int, slots: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(f"{self.method.spec}: prefix sharing is for the full model-dtype cache only")

    def store_prefill(self, layer: int, seq: Sequence, slots: Tensor, keys: Tensor, values: Tensor, lens: Tensor
                      ) -> tuple[Tensor, Tensor]:
        """Keys to device pages; values to device pages (first layers) or host pages; nothing waits in the ring."""
        write_heads(self.k_cache[layer], slots, keys, lens)
        if layer < self.full_layers:
            write_heads(self.v_cache[layer], slots, values, lens)
        else:
            write_heads(self.v_host[layer - self.full_layers], slots.cpu(), values.cpu(), lens.cpu())
            self.d2h_bytes += int(lens.sum()) * self.head_dim * values.element_size()
        return lens, torch.zeros_like(lens)

    # -- decoding -----------------------------------------------------------------------------------
    def prepare(self, seqs: list[Sequence], tables: Tensor, held: Tensor) -> KCacheStep:
        """The new tokens' key slots, ring positions, and the host slots of the rings that fill up this step."""
        tail = torch.stack([s.tail[0, 0] for s in seqs])  # type: ignore[index]
        rows = torch.tensor([s.ring_row for s in seqs])
        full = (tail + 1 >= self.recent).nonzero().flatten()
        flush = None
        if len(full):
            offloaded = held[full, self.full_layers:] - tail[full, None, None]  # (F, L', H): first slot of the ring
            logical = offloaded[..., None, :] + torch.arange(self.recent)[:, None]  # (F, L', recent, H)
            flush = (flat_slots(tables[full], logical, self.block_size), rows[full])
        put = lambda x: x.to(self.device, non_blocking=True)  # noqa: E731
        return KCacheStep(super().prepare(seqs, tables, held), put(rows), put(tail), flush)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, batch: Any, scale: float) -> Tensor:
        """Write the step's key (and value: page or ring), then attend: whole (first layers) or top N + ring."""
        step: KCacheStep = batch.kv
        heads = torch.arange(self.num_kv_heads, device=self.device).expand(len(q), -1)
        self.k_cache[layer].view(-1, self.num_kv_heads, self.head_dim)[step.slots[:, layer], heads] = k
        if layer < self.full_layers:
            self.v_cache[layer].view(-1, self.num_kv_heads, self.head_dim)[step.slots[:, layer], heads] = v
            return self._attend(q, self.k_cache[layer], self.v_cache[layer], batch.block_tables,
                                batch.lens[:, layer] + 1, batch.starts, batch.sinks, scale)
        ring = self.ring_v[layer - self.full_layers]
        ring[step.rows[:, None], step.tail[:, None], heads] = v
        return self._sparse(layer, q, batch, scale)

    def _sparse(self, layer: int, q: Tensor, batch: Any, scale: float) -> Tensor:
        """Top N of the offloaded tokens (values fetched from the host) merged with the whole ring."""
        step: KCacheStep = batch.kv
        tables = batch.block_tables.clamp(min=0).long()
        size, heads, dim = self.block_size, self.num_kv_heads, self.head_dim
        keys = self.k_cache[layer][tables].flatten(1, 2).transpose(1, 2)  # (B, H, T, D) in table order
        query = q[:, :, None]  # (B, Hq, 1, D)
        group = q.shape[1] // heads
        logits = grouped_logits(query, keys, scale)  # (B, H, G, T)
        offloaded = batch.lens[:, layer] - step.tail[:, None]  # (B, H)
        columns = torch.arange(keys.shape[2], device=self.device)
        rows_allowed = group_rows((columns < offloaded[..., None])[:, :, None], group)
        index, kept = top_per_kv_head(logits, rows_allowed, self.top(offloaded))
        flat = flat_slots(tables, index, size) * heads + torch.arange(heads, device=self.device)[:, None]
        values = fetch_rows(self.v_host[layer - self.full_layers].view(-1, dim), flat, self.device)
        self.h2d_bytes += values.numel() * values.element_size()
        picked = logits.gather(-1, index[:, :, None].expand(-1, -1, group, -1))
        selected = attend_selected(query, picked, rows_allowed, index, kept, values.view(*index.shape, dim))
        newest = torch.arange(self.recent, device=self.device)
        ring_cols = (offloaded[..., None] + newest).clamp(max=keys.shape[2] - 1)  # (B, H, recent)
        ring_logits = logits.gather(-1, ring_cols[:, :, None].expand(-1, -1, group, -1))
        in_ring = (newest <= step.tail[:, None])[:, None, None].expand_as(ring_logits)
        ring_values = self.ring_v[layer - self.full_layers][step.rows].transpose(1, 2)  # (B, H, recent, D)
        out, lse = softmax_partial(ring_logits, in_ring, ring_values)
        ring_part = out.reshape(len(q), -1, 1, dim), lse.reshape(len(q), -1, 1)
        merged, _ = merge_partials([selected, ring_part])
        return merged[:, :, 0].to(q.dtype)

    def finish(self, batch: Any) -> None:
        """Move the values of full rings to their host pages (the keys are already in the device pages)."""
        step: KCacheStep = batch.kv
        if step.flush is None:
            return
        slots, rows = step.flush
        values = self.ring_v[:, rows.to(self.device)].transpose(0, 1).cpu()  # (F, L', recent, H, D)
        layer = torch.arange(self.offloaded_layers)[None, :, None, None].expand_as(slots)
        head = torch.arange(self.num_kv_heads).expand_as(slots)
        self.v_host.view(self.offloaded_layers, -1, self.num_kv_heads, self.head_dim)[layer, slots, head] = values
        self.d2h_bytes += values.numel() * values.element_size()

    def advance(self, seq: Sequence) -> None:
        seq.kv_slots += 1
        seq.tail = (seq.tail + 1) % self.recent  # type: ignore[operator]
