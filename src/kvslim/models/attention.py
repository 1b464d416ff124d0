"""Which attention implementation a model loads with."""
from __future__ import annotations

from transformers import PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING


def implementation_for(config: PretrainedConfig, requested: str) -> str:
    """``requested``, except "sdpa" for an architecture transformers gives no sdpa path (Gemma 2, whose logit
    softcapping sdpa cannot apply): eager, which :class:`kvslim.Cache` serves as well."""
    if requested != "sdpa":
        return requested
    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return requested  # not a causal LM: the loader refuses it with its own message
    return "sdpa" if getattr(model_class, "_supports_sdpa", True) else "eager"
