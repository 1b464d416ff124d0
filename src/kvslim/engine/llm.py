"""``kvslim.engine.LLM``: offline batch generation through the paged engine."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..methods import Method
from ..methods.fp8_static import with_kv_cache_dtype
from .llm_engine import LLMEngine
from .outputs import RequestOutput
from .sampling_params import SamplingParams


class LLM(LLMEngine):
    """``LLM("smollm2-135m", policy="snapkv(keep=0.25)", kv_memory=1).generate(prompts, SamplingParams(max_tokens=64))``.

    ``model_or_name`` is a Hugging Face Llama/Qwen2/Mistral model object (give its ``tokenizer``) or anything
    :func:`kvslim.models.resolve` accepts: a built-in name, a model directory, a .gguf file, a cached hub id (the
    tokenizer then comes with it, if it has one). ``dtype=None``: bfloat16 on a GPU, float32 on the CPU.

    ``tensor_parallel_size=N`` runs N processes on ``device`` (see :mod:`kvslim.engine.parallel`). A named model
    is then loaded once on the host and shared with them (a random-weight preset only as shapes: each rank
    draws its own shards on its device), since no one device need hold it whole.

    ``kv_cache_dtype`` is vLLM's ``--kv-cache-dtype`` (``auto``, ``fp8`` = ``fp8_e4m3``, ``fp8_e5m2``): an fp8 format
    is appended to ``policy``, with static scales ``kv_scale`` ``per-tensor`` (default) or ``per-head``
    (:mod:`kvslim.methods.fp8_static`).
    """

    def __init__(self, model_or_name: Any, policy: "str | Method" = "full", kv_memory: float | None = None,
                 block_size: int | None = None, tokenizer: Any = None, dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu", tensor_parallel_size: int = 1, kv_cache_dtype: str = "auto",
                 kv_scale: str | None = None, **engine_args: Any):
        policy = with_kv_cache_dtype(policy, kv_cache_dtype, kv_scale)  # a bad value fails before a model loads
        parallel = tensor_parallel_size > 1
        if isinstance(model_or_name, str):
            from ..models import load_model, resolve

            if parallel and dtype is None and torch.device(device).type == "cuda":
                dtype = torch.bfloat16  # loaded on the host, where the default would be float32
            where = device if not parallel else "meta" if resolve(model_or_name).kind == "preset" else "cpu"
            model_or_name, loaded = load_model(model_or_name, dtype=dtype, device=where, progress=True)
            tokenizer = tokenizer or loaded
        super().__init__(model_or_name, tokenizer, policy, kv_memory, block_size, tensor_parallel_size=tensor_parallel_size,
                         device=device if parallel else None, **engine_args)

    def generate(self, prompts: "Sequence[str | list[int]] | str", params: SamplingParams | None = None,
                 suffixes: "Sequence[str | list[int]] | None" = None) -> list[RequestOutput]:
        """Run every prompt to completion with continuous batching; outputs in prompt order. ``suffixes``: one per
        prompt, appended uncompressed after the prompt is compressed (see :meth:`LLMEngine.add_request`)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
            suffixes = None if suffixes is None else [suffixes]  # type: ignore[list-item]
        if suffixes is not None and len(suffixes) != len(prompts):
            raise ValueError(f"{len(suffixes)} suffixes for {len(prompts)} prompts: give one suffix per prompt")
        params = params or SamplingParams()
        ids = [self.add_request(p, params, suffix=None if suffixes is None else suffixes[i])
               for i, p in enumerate(prompts)]
        while self.has_unfinished:
            self.step()
        return [self.finished.pop(i) for i in ids]
