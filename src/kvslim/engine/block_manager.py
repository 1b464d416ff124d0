"""Fixed-size KV blocks: a free list, reference counts, prefix sharing by hash and copy-on-write.

The pool is preallocated once (see :func:`num_blocks_for`), so running out of memory is a
scheduling decision (wait or preempt), never a crash. A block can be in several block tables:

* **prefix sharing**: a full block of prompt tokens is known by the hash of its tokens and of
  everything before it; a later prompt with the same prefix takes the same block instead of a new
  one (and the runner skips recomputing it). A block is registered under its hash when the step that
  writes its keys is scheduled (the step runs its prefills in order, so a later prompt of the same step
  reads it written): at allocation for whole prompts, chunk by chunk with chunked prefill. A step that
  fails unregisters the blocks it may have left unwritten (:meth:`forget`). A freed block keeps its hash until it is reused, so a
  prefix survives its first owner as long as the memory is not needed. The hash is a BLAKE2b chain,
  the same in every process, so it also names the block in a shared KV tier (:mod:`kvslim.cache.tier`);
* **fork**: ``n`` completions of one prompt start from the same blocks.

A shared block that must change (the next token's slot lies in it) is first copied
(copy-on-write); the caller performs the copies the manager returns.

With quantized pages each running sequence also holds one row of the full-precision residual ring
(see :mod:`kvslim.engine.kv_store`); rows are handed out and taken back with the blocks.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import deque
from typing import Callable

import torch

from .sequence import Sequence


#: Default KV pool on CPU, GiB (or a quarter of the free RAM, if less). Host memory is shared with the OS,
#: the tokenizer and every other process, and the pool is zeroed (touched) when it is made: 90% of the
#: free RAM, the GPU default, would starve them all. 4 GiB hold about 90k tokens of SmolLM2-135M.
CPU_KV_GIB = 4
CPU_KV_SHARE = 0.25


def kv_budget(kv_memory_gib: float | None, device: torch.device, fraction: float = 0.9) -> int:
    """Bytes for the KV pool: ``kv_memory_gib`` GiB or, when None, ``fraction`` of a GPU's free memory, and on
    CPU ``CPU_KV_GIB`` GiB or ``CPU_KV_SHARE`` of the free RAM, whichever is smaller."""
    if kv_memory_gib is not None:
        return int(kv_memory_gib * 2**30)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * fraction)
    import os

    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(min(CPU_KV_GIB * 2**30, free * CPU_KV_SHARE))


def num_blocks_for(block_bytes: int, budget: int) -> int:
    """Blocks of ``block_bytes`` that fit in ``budget`` bytes (at least one, or a clear error)."""
    blocks = budget // block_bytes
    if blocks < 1:
        raise ValueError(f"KV memory of {budget} bytes holds no block of {block_bytes} bytes: raise kv_memory")
    return blocks


def chain_hash(previous: int, tokens: list[int]) -> int:
    """128-bit hash of a full block's tokens and of the whole prefix before it, stable across processes."""
    digest = hashlib.blake2b(previous.to_bytes(16, "little"), digest_size=16)
    digest.update(array("q", tokens).tobytes())
    return int.from_bytes(digest.digest(), "little")


class FreeBlocks:
    """What both block managers count the same way: a fixed pool of ``num_blocks`` and the free ones in ``free``."""

    num_blocks: int
    free: deque[int]

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def flush(self) -> None:
        """Send the device what the step's allocations changed, once per step (nothing to send for dense blocks:
        the runner uploads each step's block tables itself)."""


class BlockManager(FreeBlocks):
    """Hands out blocks of ``block_size`` slots to sequences and takes them back."""

    heads = 1  # blocks a slot of every (layer, KV head) takes: one block holds them all (see head_blocks.py)

    def __init__(self, num_blocks: int, block_size: int, rows: int = 0):
        self.num_blocks, self.block_size = num_blocks, block_size
        #: called with (block, prefix hash) just before a cached prefix block is reused for new contents
        self.on_forget: Callable[[int, int], None] | None = None
        self.rows = rows
        self.free_rows: deque[int] = deque(range(rows))
        self.ref_counts = [0] * num_blocks
        self.free: deque[int] = deque(range(num_blocks))
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}

    # -- accounting ---------------------------------------------------------------------------------
    def blocks_for(self, slots: int) -> int:
        return -(-slots // self.block_size)

    def held(self, seq: Sequence) -> int:
        """Blocks ``seq`` holds."""
        return seq.num_blocks_held

    # -- allocation ---------------------------------------------------------------------------------
    def _take(self) -> int:
        """A free block for new contents: whatever prefix it cached is forgotten."""
        block = self.free.popleft()
        stale = self.block_hash[block]
        if stale is not None and self.hash_to_block.get(stale) == block:
            if self.on_forget is not None:
                self.on_forget(block, stale)
            del self.hash_to_block[stale]
        self.block_hash[block] = self.block_tokens[block] = None
        self.ref_counts[block] = 1
        return block

    def _release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] < 0:
            raise RuntimeError(f"block {block} freed twice")
        if self.ref_counts[block] == 0:
            self.free.append(block)

    def can_allocate(self, slots: int, rows: int = 1) -> bool:
        """Whether ``slots`` slots (and, with a ring, ``rows`` ring rows) are free."""
        return self.blocks_for(slots) <= self.num_free and (not self.rows or rows <= len(self.free_rows))

    def allocate(self, seq: Sequence, slots: int, shareable: int = 0, register: bool = True) -> None:
        """Give ``seq`` blocks for ``slots`` slots; the full blocks within its first ``shareable`` tokens are
        looked up by prefix hash (reused when present) and, with ``register``, registered (0: no prefix sharing).

        Sets ``seq.num_cached_tokens``: leading tokens whose keys/values are already in the shared blocks.
        ``register=False`` when the prefill may not fill the new blocks in this step (chunked prefill): a later
        prompt must not find a block whose keys will not be written; :meth:`register` then adds them chunk by chunk.
        """
        if seq.block_table:
            raise RuntimeError(f"sequence {seq.seq_id} already holds blocks")
        previous, hits, table = 0, 0, []
        for i in range(self.blocks_for(slots)):
            tokens = seq.token_ids[i * self.block_size : (i + 1) * self.block_size]
            full = (i + 1) * self.block_size <= shareable
            key = chain_hash(previous, tokens) if full else None
            block = self.hash_to_block.get(key) if key is not None and hits == i else None
            if block is not None and self.block_tokens[block] == tuple(tokens):
                if self.ref_counts[block] == 0:
                    self.free.remove(block)
                self.ref_counts[block] += 1
                hits += 1
            else:
                block = self._take()
                if key is not None and register:
                    self.block_hash[block], self.block_tokens[block] = key, tuple(tokens)
                    self.hash_to_block[key] = block
            table.append(block)
            previous = key or 0
        seq.block_table = table
        seq.num_cached_tokens = hits * self.block_size
        if self.rows:
            seq.ring_row = self.free_rows.popleft()

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix, as if each free block were reused (a KV tier still gets its spill); only
        between requests: a block in use keeps its contents for its sequence."""
        if self.num_used:
            raise RuntimeError(f"reset_prefix_cache with {self.num_used} blocks in use: finish or abort every request "
                               "first")
        for block, key in enumerate(self.block_hash):
            if key is not None and self.hash_to_block.get(key) == block and self.on_forget is not None:
                self.on_forget(block, key)
        self.hash_to_block.clear()
        self.block_hash = [None] * self.num_blocks
        self.block_tokens = [None] * self.num_blocks

    def chain_hashes(self, tokens: list[int], count: int) -> list[int]:
        """Prefix hashes of the full blocks within the first ``count`` of ``tokens`` (registered or not)."""
        hashes, previous = [], 0
        for i in range(count // self.block_size):
            previous = chain_hash(previous, tokens[i * self.block_size : (i + 1) * self.block_size])
            hashes.append(previous)
        return hashes

    def register(self, seq: Sequence, tokens: int) -> None:
        """Make ``seq``'s full blocks within its first ``tokens`` tokens findable by prefix hash (their keys and
        values are written by now, or by the step being scheduled). A block whose prefix another sequence
        registered first stays private."""
        previous = 0
        for i in range(min(tokens // self.block_size, len(seq.block_table))):
            block = seq.block_table[i]
            key = self.block_hash[block]
            if key is None:
                chunk = seq.token_ids[i * self.block_size : (i + 1) * self.block_size]
                key = chain_hash(previous, chunk)
                if key not in self.hash_to_block:
                    self.block_hash[block], self.block_tokens[block] = key, tuple(chunk)
                    self.hash_to_block[key] = block
            previous = key

    def forget(self, seq: Sequence, tokens: int) -> None:
        """Unregister ``seq``'s blocks past its first ``tokens`` tokens: a failed step may have left them unwritten
        (a block holding some of those tokens that was written may lose its hash too: only a cache miss later)."""
        for block in seq.block_table[tokens // self.block_size :]:
            key = self.block_hash[block] if block >= 0 else None
            if key is None:
                continue
            if self.hash_to_block.get(key) == block:
                del self.hash_to_block[key]
            self.block_hash[block] = self.block_tokens[block] = None

    def prefix_hashes(self, seq: Sequence) -> list[int]:
        """Hashes of the leading run of ``seq``'s blocks that are registered for prefix sharing."""
        hashes = []
        for block in seq.block_table:
            key = self.block_hash[block] if block >= 0 else None
            if key is None:
                break
            hashes.append(key)
        return hashes

    def free_seq(self, seq: Sequence) -> None:
        """Give back every block the sequence holds (shared ones only lose a reference)."""
        for block in reversed(seq.block_table):
            if block >= 0:
                self._release(block)
        seq.block_table = []
        if seq.ring_row >= 0:
            self.free_rows.append(seq.ring_row)
            seq.ring_row = -1

    def trim(self, seq: Sequence, slots: int) -> None:
        """Give back the blocks beyond the first ``slots`` slots (after compression shrank the prefill)."""
        keep = self.blocks_for(slots)
        for block in reversed(seq.block_table[keep:]):
            if block >= 0:
                self._release(block)
        del seq.block_table[keep:]
        seq.peak_blocks = max(seq.peak_blocks, seq.num_blocks_held)

    def drop(self, seq: Sequence, index: int) -> None:
        """Give back one block whose slots are all evicted (a sliding window passed it)."""
        block = seq.block_table[index]
        if block >= 0:
            self._release(block)
            seq.block_table[index] = -1

    def fork(self, parent: Sequence, child: Sequence) -> int | None:
        """``child`` shares all of ``parent``'s blocks; with a ring it gets its own row, returned for copying."""
        child.block_table = list(parent.block_table)
        for block in child.block_table:
            if block >= 0:
                self.ref_counts[block] += 1
        child.peak_blocks = parent.peak_blocks
        if not self.rows:
            return None
        child.ring_row = self.free_rows.popleft()
        return child.ring_row

    # -- decoding -----------------------------------------------------------------------------------
    def _needs_block(self, seq: Sequence) -> bool:
        index = seq.kv_slots // self.block_size
        return index >= len(seq.block_table) or self.ref_counts[seq.block_table[index]] > 1

    def can_append(self, seq: Sequence) -> bool:
        """Whether the next token's slot can be made writable (a new or a copied block, if needed)."""
        return not self._needs_block(seq) or self.num_free > 0

    def append_slot(self, seq: Sequence) -> list[tuple[int, int]]:
        """Make slot ``seq.kv_slots`` writable; returns the (source, destination) block copies to perform."""
        index = seq.kv_slots // self.block_size
        copies = []
        if index >= len(seq.block_table):
            seq.block_table.append(self._take())
            seq.peak_blocks = max(seq.peak_blocks, seq.num_blocks_held)  # only a new block can raise it
        elif self.ref_counts[seq.block_table[index]] > 1:
            old = seq.block_table[index]
            seq.block_table[index] = self._take()
            self._release(old)
            copies.append((old, seq.block_table[index]))
        return copies
