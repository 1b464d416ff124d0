"""One layer's compressed KV cache: an ordered list of segments plus per-layer method state."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .buffers import GrowingSegment, StaticSegment, grown_capacity
from .segments import DenseSegment, Segment, ragged_to_padded


def compact(x: Tensor, keep: Tensor) -> Tensor:
    """Left-align the entries of ``x`` (B,H,T,...) where ``keep`` (B,H,T) is True, as eviction lays tokens out."""
    return ragged_to_padded(x[keep], keep.sum(-1))[0]


class LayerKV:
    """The cache of one attention layer.

    Segments are kept oldest first; the last one is always a :class:`DenseSegment` that receives
    new tokens. The *dense layout* of the layer is the concatenation of each segment's padded
    layout along the token axis; methods score and select tokens in that layout.
    """

    def __init__(self, layer_idx: int, capacity: int | None = None):
        self.layer_idx = layer_idx
        #: static mode (see :mod:`.buffers`): the tail's fixed room in tokens per head; None: it grows as needed
        self.capacity = capacity
        self.segments: list[Segment] = []
        self._seen = 0  # see :attr:`seen`
        self.state: dict[str, Any] = {}  # per-layer method state (budgets, accumulated scores)
        self._tail_open = False  # whether new tokens may be appended to the last segment
        #: whether the last append brought the layer's first tokens (its first forward: a plain prompt pass)
        self.fresh = False
        #: static mode: decoding steps that ``torch.compile`` traced, counted on the device (see :meth:`append`)
        self.decode_steps: Tensor | None = None
        self._steps_pending = False  # set by compiled steps: the host counts lag ``decode_steps``

    @property
    def seen(self) -> int:
        """Tokens that went through this layer (incl. padding): positions stay true. Compiled decoding steps count
        on the device; reading this folds their count in (one sync, see :meth:`sync_counts`)."""
        if self._steps_pending:
            self.sync_counts()
        return self._seen

    def sync_counts(self) -> None:
        """Fold the decoding steps compiled steps counted on the device into the host counts: tokens ``seen`` and the
        ``decoded`` steps of the layer's state."""
        if self._steps_pending and not torch.compiler.is_compiling():
            steps = int(self.decode_steps)  # type: ignore[arg-type]
            self.decode_steps.zero_()  # type: ignore[union-attr]
            self._seen += steps
            self.state["decoded"] = self.state.get("decoded", 0) + steps
            self._steps_pending = False

    def counts_on_device(self, q_len: int) -> bool:
        """Whether this step is a static-mode decoding step traced by ``torch.compile``: it leaves every host count
        as it is (one that changed every step would be a symbolic input of the graph, and CUDA graphs would record a
        graph per value) and counts in :attr:`decode_steps`."""
        return q_len == 1 and self.decode_steps is not None and torch.compiler.is_compiling()

    # -- contents ---------------------------------------------------------------------------------
    @property
    def empty(self) -> bool:
        return not self.segments or all(s.tokens == 0 for s in self.segments)

    @property
    def lengths(self) -> Tensor:
        """Tokens held per (sequence, KV head)."""
        return sum(s.lengths for s in self.segments)  # type: ignore[return-value]

    @property
    def whole(self) -> bool:
        """Whether every (sequence, head) holds a token in every column of the dense layout, known without a host
        sync: one growing tail (see :class:`GrowingSegment`) and nothing else. Attention then needs no mask."""
        return len(self.segments) == 1 and isinstance(self.segments[0], GrowingSegment)

    @property
    def held_per_row(self) -> int | None:
        """Tokens every (sequence, head) holds when the layer is :attr:`whole`, read on the host without a sync;
        None otherwise."""
        return self.segments[0].filled if self.whole else None  # type: ignore[attr-defined]

    def fits(self, k: Tensor) -> bool:
        """Whether no (sequence, head) holds more than ``k`` (B,H) tokens: a host sync here; a layer whose counts the
        host knows (the engine's pages, read back for a decode-time eviction) answers without one."""
        return bool((self.lengths <= k).all())

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.segments)

    def widths(self) -> list[int]:
        return [s.longest for s in self.segments]

    def append(self, keys: Tensor, values: Tensor) -> None:
        """Add new tokens (B,H,q,D) for every sequence and head.

        In static mode (``capacity``) a decoding step's token goes to a :class:`StaticSegment`: the prompt is read
        and compressed in growing buffers and the tail moves there (one copy) when the prefill ends (:meth:`settle`)
        or at the latest at the next decoding step, so ``capacity`` bounds what decoding holds (a quarter of a long
        prompt for ``keep=0.25``), not the prompt.
        """
        self.fresh = not self.segments
        if not self._tail_open:
            none = keys[:, :, :0], values[:, :, :0]
            self.segments.append(GrowingSegment.holding(*none, grown_capacity(keys.shape[2])))
            self._tail_open = True
        tail = self.segments[-1]
        if self.capacity is not None and keys.shape[2] == 1 and not isinstance(tail, StaticSegment):
            tail = StaticSegment.buffering(tail, self.capacity)  # type: ignore[arg-type]
        elif not isinstance(tail, (GrowingSegment, StaticSegment)):  # kept rows of an eviction: one copy
            tail = GrowingSegment.holding(*tail.dense()[:2])
        self.segments[-1] = tail.append(keys, values)  # type: ignore[union-attr]
        if self.counts_on_device(keys.shape[2]):
            self.decode_steps.add_(1)  # type: ignore[union-attr]
            self._steps_pending = True
        else:
            self._seen = self.seen + keys.shape[2]

    def settle(self) -> None:
        """Static mode: move the open tail into its fixed buffers now (called after a prefill), so the first decoding
        step, which may be the one compiled, finds them made."""
        tail = self.segments[-1] if self._tail_open else None
        if self.capacity is not None and isinstance(tail, DenseSegment) and not isinstance(tail, StaticSegment):
            self.segments[-1] = StaticSegment.buffering(tail, self.capacity)
        if self.capacity is not None and self.decode_steps is None and self.segments:
            self.decode_steps = torch.zeros((), dtype=torch.long, device=self.segments[-1].lengths.device)
            torch._dynamo.mark_static_address(self.decode_steps)  # written in place by captured steps

    def dense(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """Keys (B,H,T,D), values (B,H,T,Dv) and valid mask (B,H,T) of the whole layer, padded.

        A layer of one segment hands out that segment's own tensors (views of a growing tail: read-only).
        """
        if len(self.segments) == 1:
            keys, values, valid = self.segments[0].dense()
            return keys.to(dtype), values.to(dtype), valid
        parts = [s.dense() for s in self.segments]
        keys = torch.cat([p[0].to(dtype) for p in parts], 2)
        values = torch.cat([p[1].to(dtype) for p in parts], 2)
        return keys, values, torch.cat([p[2] for p in parts], 2)

    # -- eviction ---------------------------------------------------------------------------------
    def _groups(self) -> list[tuple[int, int]]:
        """Runs [start, end) of segment indices: consecutive dense segments merge into one run on eviction."""
        runs: list[tuple[int, int]] = []
        for i, seg in enumerate(self.segments):
            if runs and isinstance(seg, DenseSegment) and isinstance(self.segments[runs[-1][0]], DenseSegment):
                runs[-1] = (runs[-1][0], i + 1)
            else:
                runs.append((i, i + 1))
        return runs

    def _run_slices(self, x: Tensor) -> list[Tensor]:
        widths = self.widths()
        bounds = [sum(widths[:a]) for a, _ in self._groups()] + [sum(widths)]
        return [x[:, :, lo:hi] for lo, hi in zip(bounds, bounds[1:])]

    def rewritable(self) -> Tensor:
        """(B,H,T over the dense layout) True where a held token is stored in the model's dtype (a dense segment),
        so :meth:`select` can give it a new value; packed rows are not re-encoded."""
        return torch.cat([s.valid_mask() & isinstance(s, DenseSegment) for s in self.segments], -1)

    def select(self, keep: Tensor, values: Tensor | None = None, width: int | None = None) -> None:
        """Keep only the tokens where ``keep`` (B,H,T over the dense layout) is True; storage shrinks.

        ``values`` (B,H,T,Dv over the dense layout), when given, replace the values of the kept tokens held in
        dense segments (see :meth:`rewritable`; merging methods fold evicted values into them).
        Consecutive dense segments are merged, so repeated eviction never piles up segments; a
        ragged result is closed and new tokens start a fresh uniform segment at the end of the
        layout (so the newest tokens are always the last columns of the dense layout).
        ``width``: every (sequence, head) keeps exactly this many tokens, known on the host (a uniform budget over a
        layer of one segment): the kept rows are then stored without reading anything back from the device. A
        :attr:`whole` layer keeps them in place (:meth:`GrowingSegment.keep_columns`): a decode-time eviction then
        costs a few operations instead of a ragged copy of the layer and a new tail at the next step.
        """
        self._follow(keep)
        if width is not None and self.whole:
            # kept columns in time order: a stable sort puts the kept ones first, in their order
            index = keep.to(torch.uint8).argsort(dim=-1, descending=True, stable=True)[..., :width]
            self.segments[0].keep_columns(index, values)  # type: ignore[attr-defined]
            self.segments[0] = self.segments[0].fitted()  # type: ignore[attr-defined]
            return
        kept: list[Segment] = []
        width = width if len(self.segments) == 1 else None
        new_values = self._run_slices(values) if values is not None else [None] * len(self._groups())
        for (a, b), part, new in zip(self._groups(), self._run_slices(keep), new_values):
            if isinstance(self.segments[a], DenseSegment):
                keys, old, valid = _dense_run(self.segments[a:b])
                kept.append(DenseSegment.from_padded(keys, old if new is None else new.to(old.dtype), part & valid,
                                                     width))
            else:
                kept.append(self.segments[a].select(part))
        self.segments = [s for s in kept if s.tokens] or kept[-1:]
        last = self.segments[-1]
        # static buffers take ragged rows too (padded, masked): the tail stays open for the next step
        self._tail_open = isinstance(last, DenseSegment) and (self.capacity is not None or last.uniform)

    def drop_span(self, first: int, stop: int) -> None:
        """Drop the columns [first, stop) of every row of a :attr:`whole` layer (oldest tokens after the sinks), in
        place: what ``select`` does with a mask that is False there and True elsewhere."""
        keep = self.segments[0].valid_mask().clone()
        keep[..., first:stop] = False
        self._follow(keep)
        self.segments[0].drop(first, stop)  # type: ignore[attr-defined]
        self.segments[0] = self.segments[0].fitted()  # type: ignore[attr-defined]

    def _follow(self, keep: Tensor) -> None:
        """Re-lay ``state["positions"]`` (B,H,T over the dense layout, see ``Method.before_prefill``) as the tokens."""
        if "positions" in self.state:
            self.state["positions"] = self.compact_like(self.state["positions"], keep)

    def compact_like(self, x: Tensor, keep: Tensor) -> Tensor:
        """Apply to a per-token tensor (B,H,T,...) the same re-layout that :meth:`select` applies to the cache."""
        return torch.cat([compact(xp, kp) for xp, kp in zip(self._run_slices(x), self._run_slices(keep))], 2)

    def replace(self, segments: list[Segment]) -> None:
        """Swap the storage (e.g. for quantized or channel-pruned segments) holding the same tokens; new tokens go to
        a last buffered segment (see :mod:`.buffers`), or else to a fresh one."""
        self.segments = segments
        self._tail_open = bool(segments) and isinstance(segments[-1], (GrowingSegment, StaticSegment))


def _dense_run(segments: list[Segment]) -> tuple[Tensor, Tensor, Tensor]:
    parts = [s.dense() for s in segments]
    return tuple(torch.cat([p[i] for p in parts], 2) for i in range(3))  # type: ignore[return-value]
