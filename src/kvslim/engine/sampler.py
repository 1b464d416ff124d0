"""Pick each sequence's next token from its logits: greedy, or temperature with top-k and nucleus (top-p) sampling."""
from __future__ import annotations

import torch
from torch import Tensor

from .sequence import Sequence


def top_p_filter(probs: Tensor, top_p: float) -> Tensor:
    """Zero every token outside the smallest set whose probability reaches ``top_p`` (the top token always stays)."""
    if top_p >= 1:
        return probs
    sorted_probs, order = probs.sort(descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    return probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))


def top_k_filter(logits: Tensor, top_k: int) -> Tensor:
    """Set every logit below the ``top_k``-th largest to -inf (0, or a k past the vocabulary: keep all)."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = logits.topk(top_k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def sample(logits: Tensor, seqs: list[Sequence]) -> list[int]:
    """One token per sequence from (B, vocab) float32 logits, each by its own SamplingParams."""
    greedy = logits.argmax(-1).tolist()
    tokens = []
    for row, seq, best in zip(logits, seqs, greedy):
        params = seq.params
        if params.temperature == 0:
            tokens.append(best)
            continue
        probs = top_p_filter(torch.softmax(top_k_filter(row, params.top_k) / params.temperature, -1), params.top_p)
        generator = seq.generator
        if generator is not None and generator.device != probs.device:
            probs = probs.to(generator.device)
        tokens.append(int(torch.multinomial(probs, 1, generator=generator)))
    return tokens
