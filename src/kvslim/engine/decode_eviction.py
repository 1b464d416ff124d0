"""Decode-time compression in the paged engine, batched: the per-step work is a few tensor ops, not a loop over layers.

The method's own :meth:`~kvslim.methods.ScoredEviction.due` keeps each layer's newest queries in a Python dict and
counts steps per layer; run per sequence and per layer on every step, that bookkeeping cost more than the model's
step (issues 13/14). Here the same rule runs once per sequence: every layer sees the same steps, so one counter
says when an eviction is due (every ``interval`` steps), and the newest :attr:`~ScoredEviction.observed` queries of
every layer live in one ring (L, Hq, W, D) a step writes with one copy. On a step that evicts, the sequences due that
hold the same number of remembered queries are scored together, whatever their lengths: one page read, one
:meth:`~ScoredEviction.evict` and one page write for all their layers, each (layer, sequence) a row of the
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

from ..cache.buffers import GrowingSegment
from ..cache.layer import LayerKV
from ..cache.segments import DenseSegment
from ..methods import Observation, ScoredEviction

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
        limit = max(self.method.observed, self.method.interval if tokens else 1)
        width = min(limit, prompt.shape[2] + RING_ROOM)
        ring = prompt.new_zeros(*prompt.shape[:2], width, prompt.shape[3])
        # the ring's order: the prompt's queries first, then each step's (as push writes them while filling)
        ring[:, :, : prompt.shape[2]] = prompt
        return DecodeState(states, ring, prompt.shape[2], prompt.shape[2] % width, limit, tokens=tokens)

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
        and are masked out by its held lengths, as a padded ``kvslim.Cache`` batch is)."""
        kv, device, length = runner.kv, runner.device, max(s.kv_slots for s in seqs)
        num_layers, heads, dim = runner.num_layers, runner.num_kv_heads, kv.head_dim
        held = torch.stack([s.slot_lens(num_layers, heads) for s in seqs]).to(device)  # (G, L, H)
        blocks = -(-length // kv.block_size)
        rows = [s.block_table[:blocks] for s in seqs]
        table = torch.tensor([row + row[:1] * (blocks - len(row)) for row in rows], device=device)
        logical = torch.arange(length, device=device)
        slots = table[:, logical // kv.block_size] * kv.block_size + logical % kv.block_size  # (G, T)
        pages = (kv.k_cache.view(num_layers, -1, heads, dim), kv.v_cache.view(num_layers, -1, heads, dim))
        keys, values = (p[:, slots].permute(0, 1, 3, 2, 4) for p in pages)  # (L, G, H, T, D): one read, all layers
        valid = (logical < held[..., None]).transpose(0, 1).flatten(0, 1)  # (L*G, H, T), rows layer-major
        states = [s.method_state.layers[i] for i in range(num_layers) for s in seqs]
        layer = LayerKV(0)  # every layer at once: a decode-time scorer's evict does not look at the layer index
        layer.state = {name: torch.cat([state[name] for state in states]) if isinstance(value, Tensor) else value
                       for name, value in states[0].items()}
        keys, values = keys.flatten(0, 1), values.flatten(0, 1)
        uniform = bool((held == length).all())  # every head holds every slot: no padding to mask
        layer.replace([GrowingSegment.holding(keys, values) if uniform else DenseSegment.from_padded(keys, values, valid)])
        for name in self.method.token_state:  # rows layer-major, as the states; widths are mostly one already
            stored = [s.method_state.tokens[name] for s in seqs]
            width = max(x.shape[-1] for x in stored)
            layer.state[name] = _fit(torch.stack([_fit(x, width) for x in stored], 1), length).flatten(0, 1)
        if self.method.token_state:  # the queries since the last eviction, each attending as on its own step
            steps = self.method.interval
            queries = torch.stack([s.method_state.recent(steps) for s in seqs], 1).flatten(0, 1)
            self.method.attended(Observation(layer, num_layers, queries, self.scaling, "decode", rope=self.rope), steps)
        observed = self.method.observed  # the ring may hold more (see start): the method scores with its own window
        recent = torch.stack([s.method_state.recent(observed) for s in seqs], 1).flatten(0, 1)  # (L*G, Hq, n, D)
        obs = Observation(layer, num_layers, recent, self.scaling, "decode", rope=self.rope)
        self.method.evict(obs, self.method.decode_limit(obs))
        for name in self.method.token_state:
            per_seq = layer.state[name].reshape(num_layers, len(seqs), heads, -1)
            for row, seq in enumerate(seqs):
                seq.method_state.tokens[name] = per_seq[:, row]
        kept_k, kept_v, kept = layer.dense(keys.dtype)  # left-aligned per head: slot t of a head keeps column t
        shape = (num_layers, len(seqs), heads, kept.shape[2])
        grid = slots[None, :, None, : kept.shape[2]].expand(shape).flatten(0, 1)  # (L*G, H, T')
        layer_of = torch.arange(num_layers, device=device)[:, None, None, None].expand(shape).flatten(0, 1)
        head_of = torch.arange(heads, device=device)[None, :, None].expand_as(grid)
        index = layer_of[kept], grid[kept], head_of[kept]  # (layer, slot, head) of every kept token
        pages[0][index] = kept_k[kept]  # one write per page pool for all layers
        pages[1][index] = kept_v[kept]
        for seq, lens in zip(seqs, kept.sum(-1).view(shape[:3]).transpose(0, 1).cpu()):  # (L, H) each
            seq.set_held(lens)
