"""KV storage: segments, per-layer caches and the Hugging Face cache adapter."""
from .hf_cache import Cache
from .layer import LayerKV
from .segments import DenseSegment, Segment

__all__ = ["Cache", "DenseSegment", "LayerKV", "Segment"]
