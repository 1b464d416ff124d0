"""A KV block tier below the device pool: look blocks up by key, write them back in the background.

The tier never makes serving fail. Every lookup answers, at worst with misses: when the store is
unreachable the tier logs it once, answers misses without touching the network, and tries again every
``retry_s`` seconds, logging once more when the store is back. A value that fails its checksum, is cut
short or belongs to another fingerprint is counted, deleted and treated as a miss. Writes go through a
bounded queue to one writer thread, so the engine's step never waits for the network; when the queue
is full (the store is slower than the engine) a write is dropped and counted, never blocked on.
"""
from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
import weakref
from dataclasses import asdict, dataclass
from typing import Any

from torch import Tensor

from . import entry
from .backends import Backend, TierUnavailable

log = logging.getLogger("kvslim.tier")


@dataclass
class TierStats:
    """Counters since the tier was opened (``bytes_in``: loaded from the tier, ``bytes_out``: written to it)."""

    hits: int = 0
    misses: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    writes: int = 0
    dropped_writes: int = 0
    corrupt: int = 0
    errors: int = 0
    up: bool = True

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class KVTier:
    """Entries of one fingerprint (model, dtype, policy, page layout) in a :class:`Backend`."""

    def __init__(self, backend: Backend, retry_s: float = 2.0, max_pending: int = 256):
        self.backend, self.retry_s = backend, retry_s
        self.stats = TierStats()
        self._lock = threading.Lock()
        self._retry_at = 0.0
        self._pending: queue.Queue = queue.Queue(max_pending)
        self._writer = threading.Thread(target=self._write_loop, name="kvslim-tier-writer", daemon=True)
        self._writer.start()
        atexit.register(_flush_if_alive, weakref.ref(self))  # a script that never calls close() still lands its writes

    @property
    def name(self) -> str:
        return self.backend.name

    # -- health -------------------------------------------------------------------------------------
    def _usable(self) -> bool:
        """Whether to talk to the store now (up, or down long enough to try again)."""
        return self.stats.up or time.monotonic() >= self._retry_at

    def _failed(self, err: TierUnavailable) -> None:
        with self._lock:
            self.stats.errors += 1
            self._retry_at = time.monotonic() + self.retry_s
            if self.stats.up:
                self.stats.up = False
                log.warning("kv tier %s unreachable (%s): serving without it, retrying every %.0f s",
                            self.name, err, self.retry_s)

    def _succeeded(self) -> None:
        if not self.stats.up:
            with self._lock:
                if not self.stats.up:
                    self.stats.up = True
                    log.warning("kv tier %s reachable again", self.name)

    # -- reading ------------------------------------------------------------------------------------
    def lookup(self, fingerprint: bytes, keys: list[str]) -> list[list[Tensor]]:
        """The entries of the longest run of ``keys`` the tier holds intact, from the first (host tensors).

        Blocks form a prefix chain, so a block after a missing one is of no use: the run stops there.
        """
        if not keys:
            return []
        if not self._usable():
            with self._lock:
                self.stats.misses += len(keys)
            return []
        try:
            values = self.backend.get_many(keys)
        except TierUnavailable as err:
            self._failed(err)
            with self._lock:
                self.stats.misses += len(keys)
            return []
        self._succeeded()
        found: list[list[Tensor]] = []
        for key, value in zip(keys, values):
            if value is None:
                break
            try:
                found.append(entry.decode(fingerprint, value))
            except entry.CorruptEntry as err:
                log.warning("kv tier %s: ignoring entry %s: %s", self.name, key, err)
                with self._lock:
                    self.stats.corrupt += 1
                self._discard(key)
                break
            with self._lock:
                self.stats.bytes_in += len(value)
        with self._lock:
            self.stats.hits += len(found)
            self.stats.misses += len(keys) - len(found)
        return found

    def _discard(self, key: str) -> None:
        try:
            self.backend.delete(key)
        except TierUnavailable as err:
            self._failed(err)

    # -- writing ------------------------------------------------------------------------------------
    def store(self, fingerprint: bytes, key: str, tensors: list[Tensor]) -> bool:
        """Queue one block for writing (``tensors`` already copied off the pool); False if dropped."""
        if not self._usable():
            with self._lock:
                self.stats.dropped_writes += 1
            return False
        try:
            self._pending.put_nowait((fingerprint, key, tensors))
        except queue.Full:
            with self._lock:
                self.stats.dropped_writes += 1
            return False
        return True

    def _write_loop(self) -> None:
        while True:
            job = self._pending.get()
            try:
                if job is None:
                    return
                fingerprint, key, tensors = job
                if not self._usable():
                    with self._lock:
                        self.stats.dropped_writes += 1
                    continue
                value = entry.encode(fingerprint, tensors)
                try:
                    self.backend.put(key, value)
                except TierUnavailable as err:
                    self._failed(err)
                    with self._lock:
                        self.stats.dropped_writes += 1
                    continue
                self._succeeded()
                with self._lock:
                    self.stats.writes += 1
                    self.stats.bytes_out += len(value)
            finally:
                self._pending.task_done()

    def flush(self) -> None:
        """Wait until every queued write has been tried."""
        self._pending.join()

    def close(self) -> None:
        """Finish queued writes, stop the writer and release the store."""
        self._pending.put(None)
        self._writer.join()
        self.backend.close()


def _flush_if_alive(ref: "weakref.ref[KVTier]") -> None:
    tier = ref()
    if tier is not None:
        tier.flush()


def parse_spec(spec: str) -> tuple[str, str]:
    """(kind, location) of ``memory``, ``disk:PATH`` or ``redis://HOST:PORT[/DB]``; a clear error otherwise."""
    if spec == "memory":
        return "memory", ""
    if spec.startswith("disk:") and len(spec) > len("disk:"):
        return "disk", spec[len("disk:"):]
    if spec.startswith(("redis://", "rediss://", "unix://")):
        return "redis", spec
    raise ValueError(f"--kv-tier {spec!r}: use memory, disk:PATH or redis://HOST:PORT")


def open_tier(spec: str, **options: Any) -> KVTier:
    """A tier from a :func:`parse_spec` string (``options`` go to :class:`KVTier`)."""
    from .backends import DiskBackend, MemoryBackend, RedisBackend

    kind, location = parse_spec(spec)
    backend: Backend = (MemoryBackend() if kind == "memory" else DiskBackend(location) if kind == "disk"
                        else RedisBackend(location))
    return KVTier(backend, **options)
