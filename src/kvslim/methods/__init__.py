"""Methods: what to keep and how to store it. Importing this package registers every method."""
from . import (  # noqa: F401
    adakv, auto, expected_attention, fp8_static, full, h2o, kcache, keydiff, knorm, kvzip, lagkv, lowrank, merge,
    pqcache, pyramidkv, quantizers, quest, random_keep, rkv, snapkv, streaming, think, tova,
)
from .base import Method, Observation, ScoredEviction, keep_top
from .registry import METHODS, Chain, describe, policy, register

__all__ = ["METHODS", "Chain", "Method", "Observation", "ScoredEviction", "describe", "keep_top", "policy", "register"]
