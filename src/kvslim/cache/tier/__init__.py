"""KV block tiers below the device pool (host memory, disk, Redis), shared by engines that run the same model."""
from .backends import DiskBackend, MemoryBackend, RedisBackend, TierUnavailable
from .entry import CorruptEntry
from .tier import KVTier, TierStats, open_tier, parse_spec

__all__ = ["CorruptEntry", "DiskBackend", "KVTier", "MemoryBackend", "RedisBackend", "TierStats", "TierUnavailable",
           "open_tier", "parse_spec"]
