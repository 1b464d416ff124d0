"""kvslim: small, fast KV caches for LLM inference, with honest measurements."""
from .cache import Cache
from .generate import Generation, generate, generate_ids
from .methods import METHODS, describe, policy, register
from .shape import KVShape

__all__ = ["LLM", "METHODS", "Cache", "Generation", "KVShape", "SamplingParams", "describe", "generate", "generate_ids",
           "load_model", "policy", "register"]


def __getattr__(name: str) -> object:
    """``from kvslim import LLM, SamplingParams, load_model`` as in vLLM, without importing the engine (and the
    model machinery) for users of the Hugging Face path alone."""
    if name in ("LLM", "SamplingParams"):
        from . import engine

        return getattr(engine, name)
    if name == "load_model":
        from .models import load_model

        return load_model
    raise AttributeError(f"module 'kvslim' has no attribute {name!r}")
__version__ = "0.1.0"
