"""The Hugging Face path's greedy tokens through a kvslim.Cache: what engine tests compare the engine against."""
from __future__ import annotations

import torch

import kvslim
from kvslim.hf_compat import cache_arg


@torch.inference_mode()
def hf_greedy(model, spec: str, prompt: list[int], n: int) -> list[int]:
    """``n`` greedy tokens for ``prompt`` through ``kvslim.Cache(spec)``, one step at a time, EOS ignored."""
    cache = kvslim.Cache(kvslim.policy(spec), model.config)
    ids, out = torch.tensor([prompt], device=model.device), []
    for _ in range(n):
        logits = model(ids, use_cache=True, **cache_arg(cache)).logits[0, -1]
        out.append(int(logits.argmax()))
        ids = torch.tensor([[out[-1]]], device=model.device)
    return out
