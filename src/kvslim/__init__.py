"""kvslim: small, fast KV caches for LLM inference, with honest measurements."""
from .cache import Cache
from .generate import Generation, generate, generate_ids
from .methods import METHODS, describe, policy, register
from .shape import KVShape

__all__ = ["METHODS", "Cache", "Generation", "KVShape", "describe", "generate", "generate_ids", "policy", "register"]
__version__ = "0.1.0"
