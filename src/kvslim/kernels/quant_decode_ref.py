"""Reference for :func:`kvslim.kernels.quant_decode.quant_decode`: dequantize the whole segment, then attend.

Plain PyTorch in float32, so it is the ground truth for the Triton kernel's tests and benchmark. It builds
the dequantized keys and values the kernel exists to avoid.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..cache.quantized import QuantizedSegment


def quant_decode_ref(query: Tensor, segment: QuantizedSegment, scaling: float) -> Tensor:
    """Attention (B, Hq, D) of one query (B, Hq, D) per sequence over ``segment``'s tokens (GQA), in the query's dtype.

    Keys and values are dequantized to the segment's compute dtype (what attention sees in the cache), then
    the attention is computed in float32. A (sequence, head) holding no token gives zeros.
    """
    keys, values, valid = segment.dense()
    group = query.shape[1] // keys.shape[1]
    keys = keys.float().repeat_interleave(group, 1)
    values = values.float().repeat_interleave(group, 1)
    valid = valid.repeat_interleave(group, 1)
    logits = torch.einsum("bhd,bhtd->bht", query.float(), keys) * scaling
    probs = logits.masked_fill(~valid, float("-inf")).softmax(-1).nan_to_num(0.0)
    return torch.einsum("bht,bhtd->bhd", probs, values).to(query.dtype)
