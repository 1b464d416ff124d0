"""The engine's side of a KV tier: load a prompt's blocks before its prefill, write new ones after it.

On admission the block manager finds the prompt's leading blocks that device memory still holds.
For the next full blocks, before computing them, the engine asks the tier (one round trip for all of
them) and copies the longest run it holds into the blocks just allocated; the prefill then starts
after them, exactly as it does after a device prefix hit. Blocks the prefill computed are copied off
the pool at once and written by the tier's background thread, so the engine's step never waits for
the network and another engine (or this one, after the block left device memory) can reuse them.
A cached block about to be reused for other tokens is written first if the tier does not hold it yet
(its first write was dropped), so device evictions spill to the tier.

Keys are ``kvslim:<fingerprint>:<prefix hash>``. The fingerprint covers the model (its config and a
sample of its weights: two random models of one config differ), the dtype, the policy and the page
layout, so an engine never reads blocks another model, dtype or policy wrote.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import torch

from ..cache.tier import KVTier
from .block_manager import BlockManager
from .sequence import Sequence

#: keys this engine knows the tier holds (loaded or written), so a hot prefix is not re-sent every time
KNOWN_KEYS = 1 << 16


def fingerprint(model: Any, policy_spec: str, layout: str) -> bytes:
    """16 bytes naming what a block's contents depend on: model config and weights, policy, page layout."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(model.config.to_json_string(use_diff=False).encode())
    digest.update(f"{policy_spec}|{layout}".encode())
    for weight in (model.model.embed_tokens.weight, model.model.layers[-1].self_attn.k_proj.weight):
        sample = weight.detach().flatten()[:4096].cpu().contiguous()
        digest.update(sample.view(torch.uint8).numpy().tobytes())
    return digest.digest()


def check_policy(compression: Any) -> None:
    """A tier holds shareable blocks only: refuse a policy that makes none (see ``Compression.shareable``)."""
    if not compression.shares_prefix:
        why = ("evicts by the whole prompt" if compression.evict is not None
               else "keeps the key channels the whole prompt chose" if compression.thin is not None
               else "splits blocks between device and host")
        raise ValueError(f"kv_tier: policy {compression.policy.spec} {why}, so its blocks are never shared; "
                         "use the tier with full or a quantizer alone (kivi4, int8, ...)")


class TierLink:
    """Moves one engine's prefix blocks between its pool (``store``: a kv_store) and ``tier``."""

    def __init__(self, tier: KVTier, blocks: BlockManager, store: Any, model: Any, policy_spec: str):
        self.tier, self.blocks, self.store = tier, blocks, store
        self.fingerprint = fingerprint(model, policy_spec, store.layout())
        self.prefix = f"kvslim:{self.fingerprint.hex()}:"
        self.known: OrderedDict[str, None] = OrderedDict()
        self._errors_seen = 0
        blocks.on_forget = self.spill

    def _key(self, block_hash: int) -> str:
        return f"{self.prefix}{block_hash:032x}"

    def _remember(self, key: str) -> None:
        self.known[key] = None
        self.known.move_to_end(key)
        if len(self.known) > KNOWN_KEYS:
            self.known.popitem(last=False)

    def load(self, seq: Sequence, shareable: int) -> int:
        """Fill ``seq``'s blocks within its first ``shareable`` tokens after its device hits from the tier; returns
        the tokens loaded. (By hash, not by registration: with chunked prefill a new block is registered only
        once its keys are written, see ``BlockManager.allocate``.)"""
        size = self.blocks.block_size
        hashes = self.blocks.chain_hashes(seq.token_ids, shareable)
        first = seq.num_cached_tokens // size
        keys = [self._key(h) for h in hashes[first:]]
        loaded = 0
        for index, (key, tensors) in enumerate(zip(keys, self.tier.lookup(self.fingerprint, keys)), start=first):
            targets = self.store.block_tensors(seq.block_table[index])
            if [(t.shape, t.dtype) for t in targets] != [(t.shape, t.dtype) for t in tensors]:
                break  # the fingerprint makes this impossible unless an entry was forged; recompute
            for target, source in zip(targets, tensors):
                target.copy_(source, non_blocking=True)
            self._remember(key)
            loaded += 1
        seq.num_cached_tokens += loaded * size
        return loaded * size

    def save(self, seq: Sequence) -> int:
        """Queue ``seq``'s shareable blocks the tier does not hold yet; returns the blocks queued."""
        return sum(self._write(seq.block_table[i], h) for i, h in enumerate(self.blocks.prefix_hashes(seq)))

    def spill(self, block: int, block_hash: int) -> None:
        """A cached prefix block is about to be overwritten: write it first unless the tier holds it (its write at
        prefill may have been dropped while the store was away or busy)."""
        self._write(block, block_hash)

    def _write(self, block: int, block_hash: int) -> bool:
        if self.tier.stats.errors != self._errors_seen:  # writes may have been lost while the store was away
            self._errors_seen = self.tier.stats.errors
            self.known.clear()
        key = self._key(block_hash)
        if key in self.known:
            return False
        tensors = [t.to("cpu", copy=True) for t in self.store.block_tensors(block)]
        if not self.tier.store(self.fingerprint, key, tensors):
            return False
        self._remember(key)
        return True
