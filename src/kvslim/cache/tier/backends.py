"""Where tier entries live: this process's memory, a directory, or a Redis server.

A backend stores opaque bytes by string key and knows nothing of KV blocks; :class:`~.tier.KVTier`
adds the format, the checksums, the statistics and the fault handling. A backend that cannot reach
its store raises :class:`TierUnavailable`; anything else it raises is a bug.
"""
from __future__ import annotations

import os
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Protocol


class TierUnavailable(ConnectionError):
    """The store cannot be reached (server down, directory gone); the engine recomputes meanwhile."""


class Backend(Protocol):
    name: str

    def get_many(self, keys: list[str]) -> list[bytes | None]: ...

    def put(self, key: str, value: bytes) -> None: ...

    def delete(self, key: str) -> None: ...

    def close(self) -> None: ...


class MemoryBackend:
    """Entries in this process's memory, least recently used dropped beyond ``capacity`` bytes."""

    def __init__(self, capacity: int = 2 << 30):
        if capacity <= 0:
            raise ValueError(f"memory tier capacity {capacity} bytes: give a positive size")
        self.name, self.capacity, self.size = "memory", capacity, 0
        self.entries: OrderedDict[str, bytes] = OrderedDict()
        self.lock = threading.Lock()

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        with self.lock:
            found = [self.entries.get(k) for k in keys]
            for key, value in zip(keys, found):
                if value is not None:
                    self.entries.move_to_end(key)
            return found

    def put(self, key: str, value: bytes) -> None:
        with self.lock:
            self.size -= len(self.entries.pop(key, b""))
            self.entries[key] = value
            self.size += len(value)
            while self.size > self.capacity and self.entries:
                self.size -= len(self.entries.popitem(last=False)[1])

    def delete(self, key: str) -> None:
        with self.lock:
            self.size -= len(self.entries.pop(key, b""))

    def close(self) -> None:
        with self.lock:
            self.entries.clear()
            self.size = 0


class DiskBackend:
    """One file per entry under ``root``; written to a temporary name and renamed, so a reader never sees half
    a file (a crash leaves at worst a stray ``.tmp``). Several processes may share the directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.name = f"disk:{self.root}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"kv tier directory {self.root} cannot be created ({err.strerror}): "
                             "give a writable path, e.g. --kv-tier disk:/tmp/kvslim-tier") from None

    def _path(self, key: str) -> Path:
        return self.root / f"{key.replace(':', '_')}.kv"

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        found: list[bytes | None] = []
        for key in keys:
            try:
                found.append(self._path(key).read_bytes())
            except FileNotFoundError:
                found.append(None)
            except OSError as err:
                raise TierUnavailable(f"{self.name}: {err.strerror}") from err
        return found

    def put(self, key: str, value: bytes) -> None:
        try:
            fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(value)
            os.replace(tmp, self._path(key))
        except OSError as err:
            raise TierUnavailable(f"{self.name}: {err.strerror}") from err

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def close(self) -> None:
        """Nothing to release: the files are the point."""


class RedisBackend:
    """A Redis server (``redis://HOST:PORT[/DB]``). Give the server a ``maxmemory`` with ``allkeys-lru`` to make it
    a cache; kvslim never deletes valid entries. Short socket timeouts: a dead server costs a lookup one second
    at most, and then :class:`~.tier.KVTier` stops asking until its retry time."""

    def __init__(self, url: str, timeout_s: float = 1.0):
        import redis

        self.name = url
        try:
            self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        except ValueError as err:
            raise ValueError(f"--kv-tier {url!r} is not a Redis address ({err}): use redis://HOST:PORT") from None
        self._errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.BusyLoadingError)

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        try:
            return list(self.client.mget(keys)) if keys else []
        except self._errors as err:
            raise TierUnavailable(f"{self.name}: {err}") from err

    def put(self, key: str, value: bytes) -> None:
        try:
            self.client.set(key, value)
        except self._errors as err:
            raise TierUnavailable(f"{self.name}: {err}") from err

    def delete(self, key: str) -> None:
        try:
            self.client.delete(key)
        except self._errors as err:
            raise TierUnavailable(f"{self.name}: {err}") from err

    def close(self) -> None:
        self.client.close()
