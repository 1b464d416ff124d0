"""The tier over a real redis-server on loopback, started and stopped here: hits, misses, corruption, a server
killed mid-run and restarted, a server that was never there, and two engine processes sharing a prefix."""
from __future__ import annotations

import argparse
import logging
import time

import pytest
import redis
import torch

from kvslim.bench.redis_server import RedisServer, free_port
from kvslim.bench.tier_sharing import measure
from kvslim.cache.tier import KVTier, RedisBackend
from kvslim.engine import LLM, SamplingParams

FP = b"r" * 16
GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)


def _prompt(seed: int, n: int = 40) -> list[int]:
    return torch.randint(1, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture
def server() -> RedisServer:
    try:
        with RedisServer() as server:
            yield server
    except RuntimeError as err:
        pytest.fail(str(err))


def test_hit_miss_and_bytes(server: RedisServer) -> None:
    tier = KVTier(RedisBackend(server.url))
    blocks = [[torch.randn(2, 8, 4, 16)] for _ in range(3)]
    for i, tensors in enumerate(blocks):
        tier.store(FP, f"kvslim:test:{i}", tensors)
    tier.flush()
    found = tier.lookup(FP, [f"kvslim:test:{i}" for i in range(5)])
    assert len(found) == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(found, blocks))
    assert (tier.stats.hits, tier.stats.misses) == (3, 2) and tier.stats.bytes_in == tier.stats.bytes_out > 3 * 4096
    tier.close()


def test_corrupt_entry_is_detected_and_dropped(server: RedisServer) -> None:
    tier = KVTier(RedisBackend(server.url))
    tier.store(FP, "kvslim:test:0", [torch.randn(64)])
    tier.flush()
    client = redis.Redis.from_url(server.url)
    value = bytearray(client.get("kvslim:test:0"))
    value[-1] ^= 1
    client.set("kvslim:test:0", bytes(value))
    assert tier.lookup(FP, ["kvslim:test:0"]) == [] and tier.stats.corrupt == 1
    assert client.get("kvslim:test:0") is None
    tier.close()


def test_engine_survives_a_killed_server_and_reconnects(llama, server: RedisServer, caplog) -> None:
    tier = KVTier(RedisBackend(server.url, timeout_s=0.5), retry_s=0.3)
    engine = LLM(llama, kv_memory=0.01, block_size=8, kv_tier=tier)
    plain = LLM(llama, kv_memory=0.01, block_size=8)
    engine.generate([_prompt(1)], GREEDY)
    tier.flush()
    assert tier.stats.writes == 5
    server.kill()
    with caplog.at_level(logging.WARNING, "kvslim.tier"):
        outs = engine.generate([_prompt(2), _prompt(3)], GREEDY)  # served by recomputing
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain.generate([_prompt(2), _prompt(3)], GREEDY)]
    assert not tier.stats.up and caplog.text.count("unreachable") == 1
    server.start()  # same port, empty (no persistence)
    time.sleep(0.4)
    with caplog.at_level(logging.WARNING, "kvslim.tier"):
        engine.generate([_prompt(4)], GREEDY)
    tier.flush()
    assert tier.stats.up and "reachable again" in caplog.text and tier.stats.writes == 10
    other = LLM(llama, kv_memory=0.01, block_size=8, kv_tier=tier).generate([_prompt(4)], GREEDY)[0]
    assert other.stats["tier_prompt_tokens"] == 40
    tier.close()


def test_server_that_is_not_there_costs_recomputation_only(llama, caplog) -> None:
    tier = KVTier(RedisBackend(f"redis://127.0.0.1:{free_port()}", timeout_s=0.2), retry_s=60)
    engine = LLM(llama, kv_memory=0.01, block_size=8, kv_tier=tier)
    with caplog.at_level(logging.WARNING, "kvslim.tier"):
        outs = engine.generate([_prompt(5), _prompt(6)], GREEDY)
    assert all(len(o.token_ids) == 6 for o in outs) and caplog.text.count("unreachable") == 1
    assert engine.metrics().tier["up"] is False
    tier.close()


def test_second_process_loads_the_shared_prefix(server: RedisServer) -> None:
    args = argparse.Namespace(model="tiny-llama", policy="full", prefix_tokens=256, suffix_tokens=16, max_tokens=3)
    result = measure(args, server.url)
    assert result["writer"]["tier"]["writes"] >= 256 // 16
    assert result["reader_tier_prompt_tokens"] == 256 and result["reader"]["recompute"]["tier_prompt_tokens"] == 0
    assert result["reader"]["tier"]["hits"] == 256 // 16
    print(f"TTFT recompute / from tier: {result['ttft_ratio_recompute_over_tier']:.2f}")
