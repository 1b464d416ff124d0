"""KVTier over the memory and disk backends: hits, misses, prefix runs, corruption, outages, dropped writes."""
from __future__ import annotations

import logging

import pytest
import torch

from kvslim.cache.tier import DiskBackend, KVTier, MemoryBackend, TierUnavailable, open_tier
from kvslim.cache.tier.entry import encode

FP = b"f" * 16


def _tensors(seed: int) -> list[torch.Tensor]:
    return [torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(seed))]


@pytest.fixture(params=["memory", "disk"])
def tier(request, tmp_path) -> KVTier:
    backend = MemoryBackend() if request.param == "memory" else DiskBackend(tmp_path / "tier")
    tier = KVTier(backend, retry_s=0.05)
    yield tier
    tier.close()


def test_hits_stop_at_the_first_missing_block(tier: KVTier) -> None:
    for i in (0, 1, 3):
        assert tier.store(FP, f"k{i}", _tensors(i))
    tier.flush()
    found = tier.lookup(FP, ["k0", "k1", "k2", "k3"])
    assert len(found) == 2 and torch.equal(found[1][0], _tensors(1)[0])
    assert (tier.stats.hits, tier.stats.misses, tier.stats.writes) == (2, 2, 3)
    assert tier.stats.bytes_in == 2 * len(encode(FP, _tensors(0))) and tier.stats.bytes_out == 3 * tier.stats.bytes_in // 2


def test_corrupt_entry_is_counted_dropped_and_missed(tier: KVTier, caplog) -> None:
    tier.store(FP, "k0", _tensors(0))
    tier.flush()
    good = tier.backend.get_many(["k0"])[0]
    tier.backend.put("k0", good[:-3])
    with caplog.at_level(logging.WARNING, "kvslim.tier"):
        assert tier.lookup(FP, ["k0"]) == []
    assert tier.stats.corrupt == 1 and "k0" in caplog.text
    assert tier.backend.get_many(["k0"]) == [None]  # deleted, so the next writer replaces it


def test_another_fingerprint_never_reads_the_entry(tier: KVTier) -> None:
    tier.store(FP, "k0", _tensors(0))
    tier.flush()
    assert tier.lookup(b"g" * 16, ["k0"]) == [] and tier.stats.corrupt == 1


class Flaky(MemoryBackend):
    """A memory store that can be switched off, like a server that went away."""

    def __init__(self) -> None:
        super().__init__()
        self.down, self.calls = False, 0

    def get_many(self, keys):
        self.calls += 1
        if self.down:
            raise TierUnavailable("switched off")
        return super().get_many(keys)

    def put(self, key, value):
        if self.down:
            raise TierUnavailable("switched off")
        super().put(key, value)


def test_outage_is_logged_once_skipped_until_retry_and_recovered(caplog) -> None:
    backend = Flaky()
    tier = KVTier(backend, retry_s=3600)
    tier.store(FP, "k0", _tensors(0))
    tier.flush()
    backend.down = True
    with caplog.at_level(logging.WARNING, "kvslim.tier"):
        for _ in range(5):
            assert tier.lookup(FP, ["k0"]) == []
    assert backend.calls == 1 and not tier.stats.up  # one failed call, then no traffic until the retry time
    assert caplog.text.count("unreachable") == 1
    assert not tier.store(FP, "k1", _tensors(1)) and tier.stats.dropped_writes == 1
    backend.down, tier.retry_s, tier._retry_at = False, 0.0, 0.0
    with caplog.at_level(logging.WARNING, "kvslim.tier"):
        assert len(tier.lookup(FP, ["k0"])) == 1
    assert tier.stats.up and "reachable again" in caplog.text
    tier.close()


def test_full_write_queue_drops_instead_of_blocking() -> None:
    class Slow(MemoryBackend):
        def put(self, key, value):
            import time

            time.sleep(0.05)
            super().put(key, value)

    tier = KVTier(Slow(), max_pending=2)
    accepted = [tier.store(FP, f"k{i}", _tensors(i)) for i in range(20)]
    assert not all(accepted) and tier.stats.dropped_writes == accepted.count(False)
    tier.close()
    assert tier.stats.writes == accepted.count(True)


def test_memory_backend_keeps_the_most_recently_used_within_capacity() -> None:
    backend = MemoryBackend(capacity=250)
    for key in "abc":
        backend.put(key, bytes(100))
    assert backend.get_many(list("abc")) == [None, bytes(100), bytes(100)] and backend.size == 200


@pytest.mark.parametrize("spec", ["redis:/nohost", "disk:", "s3://bucket", ""])
def test_bad_tier_specs_name_the_accepted_forms(spec: str) -> None:
    with pytest.raises(ValueError, match="memory, disk:PATH or redis://HOST:PORT"):
        open_tier(spec)


def test_queued_writes_land_when_the_process_exits_without_close(tmp_path) -> None:
    import subprocess
    import sys

    script = (f"import torch\nfrom kvslim.cache.tier import open_tier\ntier = open_tier('disk:{tmp_path}')\n"
              "for i in range(20):\n    tier.store(b'f' * 16, f'k{i}', [torch.randn(64, 64)])\n")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    assert len(list(tmp_path.glob("*.kv"))) == 20
