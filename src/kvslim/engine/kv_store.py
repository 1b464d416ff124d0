"""Where the engine keeps keys and values: model-dtype pages, or quantized pages plus a residual ring
(the offloading stores: KCache's in :mod:`kvslim.engine.offload_kv`, PQCache's in :mod:`kvslim.engine.pq_kv`;
ThinK's narrow key pages in :mod:`kvslim.engine.think_kv`).

:class:`DenseKV` is the plain pool: every token's key and value in the model dtype, one slot per token.

:class:`QuantKV` stores tokens as a kvslim quantizer packs them (``kivi2``, ``kivi4``, ``int8``, ``int4``,
``fp8``, vLLM's ``fp8_e4m3``/``fp8_e5m2`` in :mod:`kvslim.engine.fp8_kv`, and hybrids such as
``snapkv+kivi4``), so a block holds the same tokens in fewer bytes and the same ``kv_memory`` holds more of
them. It keeps the Hugging Face path's rule (``Quantizer.store``): a head's tokens are packed in whole units
of ``pack`` tokens (KIVI's key run, else one token) once more than ``residual`` newer ones follow; until
then they wait in full precision. Those newest tokens live outside the pool, in the sequence's row of a
*ring* ``(layers, rows, residual + pack, H, D)``; the rows' bytes are taken out of ``kv_memory`` before the
blocks are counted, and each sequence is charged for its row. Per-token formats keep ``residual = 0``, so
their row holds just the token being decoded: like ``kvslim.Cache``, a new token attends to its own key in
full precision, and is packed right after.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor

from ..kernels.paged_attention_ref import paged_decode_ref
from ..kernels.paged_quant import CodePages, Codes, QuantPages
from ..kernels.paged_quant_attention_ref import paged_quant_decode_ref
from ..methods import Method
from ..methods.fp8_static import StaticFP8
from ..methods.kcache import KCache
from ..methods.pqcache import PQCache
from ..methods.quantizers import Quantizer
from ..methods.quest import Quest
from ..methods.think import ThinK
from .sequence import Sequence

if TYPE_CHECKING:  # the offloading and Quest stores build on this module, so it imports them only when called
    from .offload_kv import KCacheKV
    from .pq_kv import PQCacheKV
    from .quest_kv import QuestKV
    from .think_kv import ThinKV

#: the residual rows take at most this share of ``kv_memory`` (it caps running sequences on small pools)
MAX_RING_SHARE = 0.25


def dense_block_bytes(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, block_size: int) -> int:
    """Bytes a block of model-dtype keys and values costs across all layers."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def heads_expand(slots: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    """(H, T) slot and head index grids for T slots."""
    grid = slots.expand(heads, -1)
    return grid, torch.arange(heads, device=slots.device)[:, None].expand_as(grid)


def padded_writes(rows: Tensor, lens: Tensor, first: Tensor) -> tuple[Tensor, Tensor]:
    """How to store (H, T, D) ``rows`` of which only the first ``lens[h]`` of each head count: (H, T) the column of
    the head's slots each position writes to and (H, T, D) what it writes. ``first`` (H, D): what each head's first
    slot already holds.

    Why not select the valid rows with a boolean mask: that makes the host wait for the device once per layer,
    a prefill's bottleneck on a small model. Instead every position is written: those past a head's length
    write that head's first row again to its first slot (or, for a head that keeps nothing, what the slot
    already holds), so duplicate writes carry equal values and nothing outside the kept slots changes.
    """
    steps = torch.arange(rows.shape[1], device=rows.device)
    valid = steps < lens[:, None]  # (H, T)
    fill = torch.where((lens > 0)[:, None], rows[:, 0], first)  # (H, D)
    return torch.where(valid, steps, 0), torch.where(valid[..., None], rows, fill[:, None])


def write_heads(pages: Tensor, slots: Tensor, rows: Tensor, lens: Tensor) -> None:
    """Write (H, T, D) ``rows`` into one layer's pages (blocks, block_size, H, D) at flat ``slots`` (T,),
    only the first ``lens[h]`` of each head (:func:`padded_writes`)."""
    heads, length = rows.shape[:2]
    if not length:
        return
    head = torch.arange(heads, device=rows.device)[:, None]
    flat = pages.view(-1, heads, rows.shape[-1])
    # ``slots[:1]``, not ``slots[0]``: a 0-d index tensor is read back to the host (one wait per call)
    columns, written = padded_writes(rows, lens.to(rows.device), flat[slots[:1], head[:, 0]])
    flat[slots[columns], head.expand_as(columns)] = written


def ring_rows(budget: int, max_num_seqs: int, row_bytes: int, share: float, what: str) -> int:
    """Ring rows: one per sequence that may run, within ``share`` of the budget; ``what`` says why a row is needed
    when not even one fits. Rows of no bytes (nothing waits in them) cost nothing: one per sequence."""
    if not row_bytes:
        return max_num_seqs
    rows = min(max_num_seqs, int(budget * share) // row_bytes)
    if rows < 1:
        raise ValueError(f"{what} ({row_bytes} bytes), more than {share:.0%} of the KV memory ({budget} bytes): "
                         "raise kv_memory")
    return rows


class DenseKV:
    """Pages in the model dtype: ``k_cache[layer]`` is ``(num_blocks, block_size, H, D)``."""

    quantized = False
    ring = False  # whether sequences hold a ring row (``seq.tail`` counts the tokens in it)
    row_bytes = 0
    ring_share = MAX_RING_SHARE  # the most of ``kv_memory`` the rows may take
    graphable = True  # whether a decode step can be captured in a CUDA graph (fixed shapes, no host reads)

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.k_cache = self.v_cache = torch.empty(0)
        self.block_size = 0
        self._attend = _backend(device, "paged_attention", "paged_decode", paged_decode_ref)

    def block_bytes(self, block_size: int) -> int:
        """Device bytes of one block (what ``kv_memory`` pays for)."""
        return dense_block_bytes(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype, block_size)

    def host_block_bytes(self, block_size: int) -> int:
        """Host bytes of one block: none, unless the store offloads (see :mod:`kvslim.engine.offload_kv`)."""
        return 0

    def default_block_size(self) -> int:
        return 16

    def rows_for(self, budget: int, max_num_seqs: int) -> int:
        return 0

    def allocate(self, num_blocks: int, block_size: int, rows: int) -> None:
        shape = (self.num_layers, num_blocks, block_size, self.num_kv_heads, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.block_size = block_size

    def copy_blocks(self, src: Tensor, dst: Tensor) -> None:
        self.k_cache[:, dst] = self.k_cache[:, src]
        self.v_cache[:, dst] = self.v_cache[:, src]

    def layout(self) -> str:
        """What a block's bytes mean (part of a KV tier's fingerprint)."""
        return f"dense:{self.dtype}:{self.block_size}x{self.num_kv_heads}x{self.head_dim}"

    def block_tensors(self, block: int) -> list[Tensor]:
        """Views of one block across every layer, as a KV tier stores it."""
        return [self.k_cache[:, block], self.v_cache[:, block]]

    def read(self, layer: int, slots: Tensor) -> tuple[Tensor, Tensor]:
        """(T, H, D) keys and values at flat slots (a cached prefix)."""
        flat = (-1, self.num_kv_heads, self.head_dim)
        return self.k_cache[layer].view(flat)[slots], self.v_cache[layer].view(flat)[slots]

    def store_prefill(self, layer: int, seq: Sequence, slots: Tensor, keys: Tensor, values: Tensor, lens: Tensor
                      ) -> tuple[Tensor, Tensor | None]:
        """Store (H, T, D) keys/values at flat ``slots`` (T,), only the first ``lens[h]`` of each head.

        Returns the slots each head now holds in pages (counted from ``slots[0]``) and its ring tokens (None: no ring).
        """
        write_heads(self.k_cache[layer], slots, keys, lens)
        write_heads(self.v_cache[layer], slots, values, lens)
        return lens, None

    def write(self, layer: int, slots: Tensor, keys: Tensor, values: Tensor) -> None:
        """Store (H, T, D) keys/values at per-head flat ``slots`` (H, T): tokens appended after heads that hold
        different numbers of slots (a suffix after a ragged compressed prefill)."""
        heads = torch.arange(self.num_kv_heads, device=self.device)[:, None].expand_as(slots)
        self.k_cache[layer].view(-1, self.num_kv_heads, self.head_dim)[slots, heads] = keys
        self.v_cache[layer].view(-1, self.num_kv_heads, self.head_dim)[slots, heads] = values

    # -- decoding -----------------------------------------------------------------------------------
    def grows(self, seq: Sequence) -> bool:
        """Whether the next decode step writes page slot ``seq.kv_slots`` (which must then be writable)."""
        return True

    def prepare(self, seqs: list[Sequence], tables: Tensor, held: Tensor) -> Tensor:
        """Per step: the flat slot (B, L, H) each head's new token is written to."""
        block = tables.long().gather(1, held.flatten(1) // self.block_size).view_as(held)
        return (block * self.block_size + held % self.block_size).to(self.device, non_blocking=True)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, batch: Any, scale: float) -> Tensor:
        """Write the step's keys/values (B, H, D), then attend (B, Hq, D) over each sequence's pages."""
        slots = batch.kv[:, layer]
        heads = torch.arange(self.num_kv_heads, device=self.device).expand(len(q), -1)
        self.k_cache[layer].view(-1, self.num_kv_heads, self.head_dim)[slots, heads] = k
        self.v_cache[layer].view(-1, self.num_kv_heads, self.head_dim)[slots, heads] = v
        return self._attend(q, self.k_cache[layer], self.v_cache[layer], batch.block_tables, batch.lens[:, layer] + 1,
                            batch.starts, batch.sinks, scale)

    def finish(self, batch: Any) -> None:
        """Nothing to move after a step: every token went to its page."""

    def advance(self, seq: Sequence) -> None:
        seq.kv_slots += 1


@dataclass
class QuantStep:
    """What one decode step of :class:`QuantKV` reads: ring rows and lengths, and the packs to run after it."""

    rows: Tensor  # (B,) ring row of each sequence
    ring_write: Tensor  # (B, L, H) ring position of the new token
    ring_lens: Tensor  # (B, L, H) ring tokens attended (the new one included)
    packs: tuple[Tensor, Tensor, Tensor, Tensor] | None  # (layer, row, head, first flat slot) per head that packs


class QuantKV:
    """Quantized pages plus the per-sequence residual ring (see the module docstring)."""

    quantized = True
    ring = True
    ring_share = MAX_RING_SHARE
    graphable = True

    def __init__(self, quantizer: Quantizer, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        self.quantizer = quantizer
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.residual, self.pack = quantizer.residual, quantizer.block()
        self.capacity = self.residual + self.pack
        self._setup_codes()
        element = torch.empty((), dtype=dtype).element_size()
        self.row_bytes = 2 * num_layers * self.capacity * num_kv_heads * head_dim * element
        self.block_size = 0
        self.pages: QuantPages | None = None
        self.ring_k = self.ring_v = torch.empty(0)
        self._attend = _backend(device, "paged_quant_attention", "paged_quant_decode", paged_quant_decode_ref,
                                lambda module: module.triton_supports(self.key_codes, self.value_codes))

    def _setup_codes(self) -> None:
        """The quantizer's encoders and the page formats (``key_codes``, ``value_codes``) their codes take."""
        self.encode_keys, self.encode_values = self.quantizer.encoders(self.head_dim, self.head_dim)
        probe = torch.randn(self.pack, self.head_dim)
        self.key_codes = Codes.of(self.encode_keys(probe), self.head_dim)
        self.value_codes = Codes.of(self.encode_values(probe), self.head_dim)

    def block_bytes(self, block_size: int) -> int:
        self.check_block_size(block_size)
        codes = (self.key_codes, self.value_codes)
        return self.num_layers * sum(c.block_bytes(block_size, self.num_kv_heads, self.head_dim) for c in codes)

    def host_block_bytes(self, block_size: int) -> int:
        return 0

    def default_block_size(self) -> int:
        return max(16, self.pack)

    def check_block_size(self, block_size: int) -> None:
        if block_size % self.pack:
            raise ValueError(f"{self.quantizer.spec} packs keys in runs of {self.pack} tokens, which must not straddle "
                             f"blocks: use a block_size that is a multiple of {self.pack}, not {block_size}")

    def rows_for(self, budget: int, max_num_seqs: int) -> int:
        """Ring rows: one per sequence that may run, within ``MAX_RING_SHARE`` of the budget."""
        what = f"{self.quantizer.spec} keeps up to {self.capacity} newest tokens per sequence in full precision"
        return ring_rows(budget, max_num_seqs, self.row_bytes, self.ring_share, what)

    def allocate(self, num_blocks: int, block_size: int, rows: int) -> None:
        args = (self.num_layers, num_blocks, block_size, self.num_kv_heads, self.head_dim, self.device)
        self.pages = QuantPages(CodePages.allocate(self.key_codes, *args), CodePages.allocate(self.value_codes, *args))
        ring = (self.num_layers, rows, self.capacity, self.num_kv_heads, self.head_dim)
        self.ring_k = torch.zeros(ring, dtype=self.dtype, device=self.device)
        self.ring_v = torch.zeros(ring, dtype=self.dtype, device=self.device)
        self.block_size = block_size

    def copy_blocks(self, src: Tensor, dst: Tensor) -> None:
        for t in self.pages.tensors():  # type: ignore[union-attr]
            t[:, dst] = t[:, src]

    def layout(self) -> str:
        return f"{self.quantizer.spec}:{self.key_codes}:{self.value_codes}:{self.block_size}x{self.num_kv_heads}x{self.head_dim}"

    def block_tensors(self, block: int) -> list[Tensor]:
        """Views of one block's codes, scales and zero points across every layer: a tier stores them packed."""
        return [t[:, block] for t in self.pages.tensors()]  # type: ignore[union-attr]

    def read(self, layer: int, slots: Tensor) -> tuple[Tensor, Tensor]:
        """(T, H, D) keys and values at flat slots (a cached prefix), dequantized to the model dtype."""
        blocks, offsets = slots // self.block_size, slots % self.block_size
        unique, inverse = torch.unique_consecutive(blocks, return_inverse=True)
        pages = self.pages.layer(layer)  # type: ignore[union-attr]
        return tuple(p.dequantize(unique)[inverse, offsets].to(self.dtype) for p in (pages.keys, pages.values))  # type: ignore[return-value]

    def copy_row(self, src: int, dst: int) -> None:
        self.ring_k[:, dst] = self.ring_k[:, src]
        self.ring_v[:, dst] = self.ring_v[:, src]

    def _write(self, layers: Tensor | int, rows: Tensor | int, slots: Tensor, heads: Tensor, keys: Tensor,
               values: Tensor) -> None:
        """Quantize rows (N, D) (KIVI: whole runs, one head's consecutive slots each) into the pages; ``rows``: each
        entry's ring row (its sequence, whose scales static formats look up)."""
        self.pages.keys.write(layers, slots, heads, self.encode_keys(keys))  # type: ignore[union-attr]
        self.pages.values.write(layers, slots, heads, self.encode_values(values))  # type: ignore[union-attr]

    def store_prefill(self, layer: int, seq: Sequence, slots: Tensor, keys: Tensor, values: Tensor, lens: Tensor
                      ) -> tuple[Tensor, Tensor]:
        """Pack each head's oldest whole units beyond the newest ``residual`` tokens; the rest go to its ring row."""
        heads, length = keys.shape[:2]
        packed = (lens - self.residual).clamp(min=0) // self.pack * self.pack
        t = torch.arange(length, device=self.device)
        grid, head = heads_expand(slots, heads)
        pack = t < packed[:, None]
        if bool(pack.any()):
            self._write(layer, seq.ring_row, grid[pack], head[pack], keys[pack], values[pack])
        ring = (t >= packed[:, None]) & (t < lens[:, None])
        position = (t - packed[:, None]).expand(heads, -1)
        self.ring_k[layer, seq.ring_row, position[ring], head[ring]] = keys[ring]
        self.ring_v[layer, seq.ring_row, position[ring], head[ring]] = values[ring]
        return packed, lens - packed

    # -- decoding -----------------------------------------------------------------------------------
    def _packs(self, seq: Sequence) -> Tensor:
        """(L, H) heads whose ring is full once this step's token is in: they pack ``pack`` tokens after it."""
        return seq.tail + 1 >= self.capacity  # type: ignore[operator]

    def grows(self, seq: Sequence) -> bool:
        held = seq.slot_lens(self.num_layers, self.num_kv_heads)
        return bool((self._packs(seq) & (held == seq.kv_slots)).any())

    def prepare(self, seqs: list[Sequence], tables: Tensor, held: Tensor) -> QuantStep:
        tail = torch.stack([s.tail for s in seqs])  # type: ignore[misc]
        rows = torch.tensor([s.ring_row for s in seqs])
        packs = tail + 1 >= self.capacity
        plan = None
        if bool(packs.any()):
            b, layer, head = packs.nonzero(as_tuple=True)
            first = held[b, layer, head]
            block = tables.long()[b, first // self.block_size]
            plan = tuple(x.to(self.device, non_blocking=True)
                         for x in (layer, rows[b], head, block * self.block_size + first % self.block_size))
        put = lambda x: x.to(self.device, non_blocking=True)  # noqa: E731
        return QuantStep(put(rows), put(tail), put(tail + 1), plan)  # type: ignore[arg-type]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, batch: Any, scale: float) -> Tensor:
        """Put the step's keys/values (B, H, D) in the ring, then attend over pages and ring."""
        step: QuantStep = batch.kv
        heads = torch.arange(self.num_kv_heads, device=self.device).expand(len(q), -1)
        rows = step.rows[:, None].expand_as(heads)
        self.ring_k[layer][rows, step.ring_write[:, layer], heads] = k
        self.ring_v[layer][rows, step.ring_write[:, layer], heads] = v
        return self._attend(q, self.pages.layer(layer), batch.block_tables, batch.lens[:, layer],  # type: ignore[union-attr]
                            batch.starts, batch.sinks, self.ring_k[layer], self.ring_v[layer], step.rows,
                            step.ring_lens[:, layer], scale)

    def finish(self, batch: Any) -> None:
        """After every layer attended: pack the oldest ``pack`` ring tokens of full rings, shift the rest down."""
        step: QuantStep = batch.kv
        if step.packs is None:
            return
        layer, row, head, first = step.packs
        units = torch.arange(self.pack, device=self.device)
        at = (layer[:, None], row[:, None], units[None, :], head[:, None])
        keys, values = self.ring_k[at].flatten(0, 1), self.ring_v[at].flatten(0, 1)
        spread = lambda x: x.repeat_interleave(self.pack)  # noqa: E731
        self._write(spread(layer), spread(row), (first[:, None] + units).flatten(), spread(head), keys, values)
        if self.residual:
            kept = torch.arange(self.residual, device=self.device)
            src = (layer[:, None], row[:, None], kept[None, :] + self.pack, head[:, None])
            dst = (layer[:, None], row[:, None], kept[None, :], head[:, None])
            self.ring_k[dst] = self.ring_k[src]
            self.ring_v[dst] = self.ring_v[src]

    def advance(self, seq: Sequence) -> None:
        packs = self._packs(seq)
        held = seq.slot_lens(self.num_layers, self.num_kv_heads) + self.pack * packs
        seq.tail = seq.tail + 1 - self.pack * packs  # type: ignore[operator]
        seq.set_held(held)


def _backend(device: torch.device, module: str, name: str, reference: Callable[..., Tensor],
             supports: Callable[[Any], bool] = lambda module: True) -> Callable[..., Tensor]:
    """The Triton kernel on CUDA when Triton is installed and the kernel ``supports`` the format, else the reference."""
    if device.type != "cuda":
        return reference
    import importlib

    try:
        kernels = importlib.import_module(f"kvslim.kernels.{module}")
    except ImportError:
        return reference
    return getattr(kernels, name) if supports(kernels) else reference


def make_store(storage: Method | None, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
               device: torch.device) -> "DenseKV | QuantKV | KCacheKV | PQCacheKV | QuestKV | ThinKV":
    """The store for a policy's storage format (:attr:`Compression.storage`): None keeps the model dtype."""
    from .fp8_kv import StaticFP8KV  # the other stores build on this module, so they import it
    from .offload_kv import KCacheKV
    from .pq_kv import PQCacheKV
    from .quest_kv import QuestKV
    from .think_kv import ThinKV

    args = (num_layers, num_kv_heads, head_dim, dtype, device)
    if storage is None:
        return DenseKV(*args)
    if isinstance(storage, StaticFP8):
        return StaticFP8KV(storage, *args)
    if isinstance(storage, Quantizer):
        return QuantKV(storage, *args)
    if isinstance(storage, KCache):
        return KCacheKV(storage, *args)
    if isinstance(storage, PQCache):
        return PQCacheKV(storage, *args)  # type: ignore[return-value]
    if isinstance(storage, Quest):
        return QuestKV(storage, *args)
    if isinstance(storage, ThinK):
        return ThinKV(storage, *args)
    raise ValueError(f"the engine has no store for {storage.spec}")
