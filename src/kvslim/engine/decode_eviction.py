"""Decode-time compression in the paged engine, batched: the per-step work is a few tensor ops, not a loop over layers.

The method's own :meth:`~kvslim.methods.ScoredEviction.due` keeps each layer's newest queries in a Python dict and
counts steps per layer; run per sequence and per layer on every step, that bookkeeping cost more than the model's
step (issues 13/14). Here the same rule runs once per sequence: every layer sees the same steps, so one counter
says when an eviction is due (every ``interval`` steps), and the newest :attr:`~ScoredEviction.decode_observed`
queries of every layer live in one ring (L, Hq, W, D) a step writes with one copy. On a step that evicts, the
sequences due that hold the same number of remembered queries are scored together, whatever their lengths: one page
read, one :meth:`~ScoredEviction.evict` and one page write for all their layers, each (layer, sequence) a row of the
observation's batch, padded to the longest as a ``kvslim.Cache`` batch of prompts of different lengths is (its
valid mask keeps padding out of every score and budget), so it keeps the same tokens as under ``kvslim.Cache``.
Grouping by length instead made a step of 110 RULER answers of different prompt lengths 110 evictions, each
waiting for the device (~200 ms a step on an H200). The contract this relies on: a decode-time scorer's ``evict`` treats batch rows
independently and does not look at the layer index (``ScoredEviction.evict`` and every registered scorer; the
layer-dependent budgets of PyramidKV or auto are set at prefill, in the state's ``budget``).

A method whose per-token state every step adds to (:attr:`~ScoredEviction.token_state`: H2O's accumulated attention)
keeps it per sequence as one (L, H, slots) tensor on the device, slot ``t`` of a head the score of the token in its
slot ``t``. It is brought up to date only on the steps that evict: the ring then holds at least the ``interval``
queries since the last eviction, and :meth:`~ScoredEviction.attended` adds them one step at a time, each attending
causally to the pages' tokens (nothing was evicted in between, so each sees what it saw on its step). The
compaction moves the scores with their tokens (the method's ``reflow``); slots written since hold zero."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..methods import Observation, ScoredEviction
from .page_batch import PageBatch

#: query columns a ring holds past the prompt's before it grows (a method that observes fewer gets exactly that many)
RING_ROOM = 64


@dataclass
class DecodeState:
    """One sequence's decode-time compression state: the method's per-layer state (budget), a ring of queries and any
    per-token state (see the module docstring)."""

    layers: list[dict]  # per layer, the method's state after the prefill, without its remembered queries
    ring: Tensor  # (L, Hq, W, D) the newest W queries of every layer, written round-robin
    count: int  # queries in the ring (W once full)
    head: int  # the column the next query goes to: the first free one, then the oldest
    limit: int  # the most queries the method needs (its ``observed``, its ``interval``): the ring grows up to it
    steps: int = 0  # decoding steps since the prefill
    #: the method's per-token state (see the module docstring), each (L, H, slots); slots past a head's held ones are 0
    tokens: dict[str, Tensor] = field(default_factory=dict)
    #: the per-layer states' tensors of one shape (1, ...) as one (L, ...) each: a group stacks G of them, not L*G
    stacked: dict[str, Tensor] = field(default_factory=dict)
    host_limit: Tensor | None = None  # (L, H) the decode limit on the host, read the first time it evicts

    def __post_init__(self) -> None:
        for name, value in self.layers[0].items():
            per_layer = [state[name] for state in self.layers]
            if isinstance(value, Tensor) and value.dim() and value.shape[0] == 1 \
                    and all(x.shape == value.shape for x in per_layer):
                self.stacked[name] = torch.cat(per_layer)

    def push(self, queries: Tensor) -> None:
        """Record one step's queries (L, Hq, D) of every layer."""
        width = self.ring.shape[2]
        if self.count == width < self.limit:  # full, and the method wants more: double it, oldest first
            grown = min(self.limit, 2 * width)
            self.ring = torch.cat([self.recent(), self.ring.new_zeros(*self.ring.shape[:2], grown - width,
                                                                      self.ring.shape[3])], 2)
            self.head, width = self.count, grown
        self.ring[:, :, self.head] = queries
        self.head = (self.head + 1) % width
        self.count = min(self.count + 1, width)
        self.steps += 1

    def recent(self, n: int | None = None) -> Tensor:
        """(L, Hq, n, D) the newest ``n`` remembered queries (all when None), oldest first: a view of the ring unless
        they wrap around its end (H2O reads one column a step from a ring of 64)."""
        n = self.count if n is None else min(n, self.count)
        width = self.ring.shape[2]
        start = (self.head - n) % width  # while filling, head == count
        if start + n <= width:
            return self.ring[:, :, start : start + n]
        return torch.cat([self.ring[:, :, start:], self.ring[:, :, : start + n - width]], 2)


def _fit(x: Tensor, width: int) -> Tensor:
    """``x`` (..., T) padded with zeros or cut to ``width`` columns (a per-token state over a sequence's slots)."""
    if width == x.shape[-1]:
        return x
    return F.pad(x, (0, width - x.shape[-1])) if width > x.shape[-1] else x[..., :width]


class DecodeEviction:
    """Runs one decoding evictor (``method``) for every sequence of a step; see the module docstring."""

    def __init__(self, method: ScoredEviction, num_layers: int, scaling: float, rope: Tensor | None):
        self.method, self.num_layers, self.scaling, self.rope = method, num_layers, scaling, rope
        self.key = f"{method.name}.queries"  # where ScoredEviction.remember keeps the queries (see start)

    def start(self, states: list[dict]) -> DecodeState | None:
        """A sequence's decode state from each layer's state after its prefill (None when no layer holds a budget:
        the method lets the cache grow)."""
        if not all("budget" in state for state in states):
            if any("budget" in state for state in states):
                raise ValueError(f"{self.method.spec}: some layers hold a decode budget and others do not; the engine "
                                 "evicts every layer of a sequence on the same steps")
            return None
        prompt = torch.cat([state.pop(self.key) for state in states])  # (L, Hq, w, D), w <= observed
        tokens = {}
        for name in self.method.token_state:  # each layer's (1, H, kept) after the prefill: one (L, H, slots)
            per_layer = [state.pop(name) for state in states]
            width = max(x.shape[-1] for x in per_layer)
            tokens[name] = torch.cat([_fit(x, width) for x in per_layer])
        # may be unbounded (expected_attention(history=None)): the ring then grows; a method with per-token state
        # also needs every query since the last eviction
        limit = max(self.method.decode_observed, self.method.interval if tokens else 1)
        if prompt.shape[2] > limit:  # the prefill remembered its ``observed`` queries, more than decoding needs
            prompt = prompt[:, :, -limit:]
        width = min(limit, prompt.shape[2] + RING_ROOM)
        ring = prompt.new_zeros(*prompt.shape[:2], width, prompt.shape[3])
        # the ring's order: the prompt's queries first, then each step's (as push writes them while filling)
        ring[:, :, : prompt.shape[2]] = prompt
        return DecodeState(states, ring, prompt.shape[2], prompt.shape[2] % width, limit, tokens=tokens)

    def split(self, state: dict, lengths: list[int], kept: Tensor | None) -> list[dict]:
        """One layer's state after a batched prefill of prompts of these ``lengths`` (``Compression.compress_packed``,
        laid out as ``PackedPrompts``) -> each prompt's state, exactly the one its prefill alone leaves, so it decodes
        as it would alone. ``kept`` (B, H) on the host: what each prompt's heads kept, read only by a method with
        per-token state (:attr:`~ScoredEviction.token_state`).

        Every tensor's row b is prompt b's (budget, prompt length). Its remembered queries are the batch's window,
        left-padded with its first query where it is shorter than the window: alone it remembers its own ones only.
        Its per-token state spans the batch's longest kept row: alone, its own longest head. Entries that are not
        tensors are host caches of the batch's tensors (a budget's range, keyed by the tensor): each prompt's state
        reads its own again."""
        out = []
        for b, n in enumerate(lengths):
            own = {}
            for name, value in state.items():
                if not isinstance(value, Tensor):
                    continue
                row = value[b : b + 1]
                if name == self.key:
                    row = row[:, :, max(0, row.shape[2] - n) :]
                elif name in self.method.token_state:
                    row = row[..., : int(kept[b].max())]  # type: ignore[index]
                own[name] = row
            out.append(own)
        return out

    def step(self, seqs: list, queries: Tensor, runner) -> list:
        """Record the step's queries (B, L, Hq, D) of each sequence (``None`` state: skipped); evict where due.
        Returns the sequences whose pages were compacted (their held slots changed)."""
        due: dict[int, list] = defaultdict(list)
        for row, seq in enumerate(seqs):
            state: DecodeState | None = seq.method_state
            if state is None:
                continue
            state.push(queries[row])
            if state.steps % self.method.interval == 0:
                due[state.count].append(seq)
        changed = []
        for group in due.values():
            self._evict(group, runner)
            changed += group
        return changed

    def _evict(self, seqs: list, runner) -> None:
        """Score and compact a group of sequences holding the same number of remembered queries: their pages are
        read as one padded batch over the longest one's slots (a shorter one's extra columns repeat its first block
        and are masked out by its held lengths, as a padded ``kvslim.Cache`` batch is), scored as one layer
        (:class:`PageBatch`) and written back in place. The host waits for the device only the first time a sequence
        evicts (to read its decode limit) and for a method with its own selection rule (to read the kept counts)."""
        kv, device, length = runner.kv, runner.device, max(s.kv_slots for s in seqs)
        num_layers, heads, dim, block = runner.num_layers, runner.num_kv_heads, kv.head_dim, kv.block_size
        held = torch.stack([s.slot_lens(num_layers, heads) for s in seqs], 1).flatten(0, 1)  # (L*G, H), layer-major
        blocks = -(-length // block)
        rows = [s.block_table[:blocks] for s in seqs]
        table = torch.tensor([row + row[:1] * (blocks - len(row)) for row in rows], device=device)
        logical = torch.arange(length, device=device)
        slots = table[:, logical // block] * block + logical % block  # (G, T)
        pages = (kv.k_cache.view(num_layers, -1, heads, dim), kv.v_cache.view(num_layers, -1, heads, dim))
        keys, values = (p[:, slots].permute(0, 1, 3, 2, 4).flatten(0, 1) for p in pages)  # (L*G, H, T, D): one read
        layer = PageBatch(keys, values, held)
        layer.state = self._state(seqs)
        for name in self.method.token_state:  # rows layer-major, as the states; widths are mostly one already
            stored = [s.method_state.tokens[name] for s in seqs]
            width = max(x.shape[-1] for x in stored)
            layer.state[name] = _fit(torch.stack([_fit(x, width) for x in stored], 1), length).flatten(0, 1)
        if self.method.token_state:  # the queries since the last eviction, each attending as on its own step
            steps = self.method.interval
            queries = torch.stack([s.method_state.recent(steps) for s in seqs], 1).flatten(0, 1)
            self.method.attended(Observation(layer, num_layers, queries, self.scaling, "decode", rope=self.rope), steps)
        observed = self.method.decode_observed  # the ring may hold more (see start): the method's own window
        recent = torch.stack([s.method_state.recent(observed) for s in seqs], 1).flatten(0, 1)  # (L*G, Hq, n, D)
        obs = Observation(layer, num_layers, recent, self.scaling, "decode", rope=self.rope)
        limit = self.method.decode_limit(obs)
        if limit is not None:
            layer.know_limit(limit, self._host_limit(seqs, limit))
        self.method.evict(obs, limit)
        for name in self.method.token_state:
            per_seq = layer.state[name].reshape(num_layers, len(seqs), heads, -1)
            for row, seq in enumerate(seqs):
                seq.method_state.tokens[name] = per_seq[:, row]
        if layer.kept is None:  # every row fits its budget: nothing moved
            return
        # a shorter sequence's columns past its own blocks read its first block again: they take that block's writes
        own = [len(row) * block for row in rows]
        columns = None if min(own) >= length else \
            torch.where(logical < torch.tensor(own, device=device)[:, None], logical, logical % block)
        kept_k, kept_v = layer.compacted(None if columns is None else columns.repeat(num_layers, 1))
        for page, kept in zip(pages, (kept_k, kept_v)):  # one write per page pool for all layers
            page[:, slots] = kept.view(num_layers, len(seqs), heads, length, dim).transpose(2, 3)
        if type(self.method).evict is ScoredEviction.evict and type(self.method).choose is ScoredEviction.choose:
            now = torch.minimum(held, layer.host_limit)  # the top k of each row: k of them, or all it held
        else:
            now = layer.kept.sum(-1).cpu()
        for seq, lens in zip(seqs, now.view(num_layers, len(seqs), heads).transpose(0, 1)):  # (L, H) each
            seq.set_held(lens)

    def _state(self, seqs: list) -> dict:
        """The method's per-layer states of ``seqs`` as one state, rows layer-major (see ``DecodeState.stacked``)."""
        states = [s.method_state for s in seqs]
        merged = {}
        for name, value in states[0].layers[0].items():
            if all(name in state.stacked for state in states):
                merged[name] = torch.stack([state.stacked[name] for state in states], 1).flatten(0, 1)
            elif isinstance(value, Tensor):
                merged[name] = torch.cat([state.layers[i][name] for i in range(self.num_layers) for state in states])
            else:
                merged[name] = value
        return merged

    def _host_limit(self, seqs: list, limit: Tensor) -> Tensor:
        """``limit`` (L*G, H) read on the host: the decode limits are fixed after the prefill, so each sequence's is
        read once (one sync, the first time it evicts) and kept."""
        if any(s.method_state.host_limit is None for s in seqs):
            for seq, lens in zip(seqs, limit.view(self.num_layers, len(seqs), -1).transpose(0, 1).cpu()):
                seq.method_state.host_limit = lens
        return torch.stack([s.method_state.host_limit for s in seqs], 1).flatten(0, 1)
