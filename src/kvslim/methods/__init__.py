"""Methods: what to keep and how to store it. Importing this package registers every method."""
from . import adakv, full, h2o, kcache, knorm, pqcache, pyramidkv, quantizers, random_keep, snapkv, streaming, think, tova  # noqa: F401
from .base import Method, Observation, ScoredEviction, keep_top
from .registry import METHODS, Chain, describe, policy, register

__all__ = ["METHODS", "Chain", "Method", "Observation", "ScoredEviction", "describe", "keep_top", "policy", "register"]
