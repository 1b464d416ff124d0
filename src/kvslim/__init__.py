"""kvslim: small, fast KV caches for LLM inference, with honest measurements."""
from .cache import Cache
from .methods import METHODS, describe, policy, register
from .shape import KVShape

__all__ = ["METHODS", "Cache", "KVShape", "describe", "policy", "register"]
__version__ = "0.1.0"
