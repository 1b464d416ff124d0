"""One weight matrix for q/k/v and one for gate/up, shared with the Hugging Face modules (no copy kept).

Why: at decode batch sizes every projection is a matrix-vector product bound by reading its weight,
and k_proj/v_proj of a GQA model are narrow (a quarter of q_proj's rows or less), too small to reach
the memory bandwidth alone; one GEMM over the stacked rows reads the same bytes in one launch. The
stacked matrix is built once and the modules' parameters are re-pointed to row views of it, so the
model keeps working unchanged and the memory is not doubled; a second engine over the same model
finds the rows already stacked and reuses them.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def _adjacent(tensors: list[Tensor]) -> bool:
    """Whether the tensors are consecutive row blocks of one contiguous storage."""
    if not all(t.is_contiguous() for t in tensors):
        return False
    storage = tensors[0].untyped_storage().data_ptr()
    return all(t.untyped_storage().data_ptr() == storage for t in tensors) and all(
        a.data_ptr() + a.numel() * a.element_size() == b.data_ptr() for a, b in zip(tensors, tensors[1:]))


def _stack(params: list[Tensor]) -> Tensor:
    """The parameters as one (sum rows, ...) tensor whose row blocks they become views of."""
    tensors = [p.data for p in params]
    if _adjacent(tensors):
        first = tensors[0]
        rows = sum(t.shape[0] for t in tensors)
        return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(), (rows, *first.shape[1:]))
    with torch.no_grad():
        stacked = torch.cat(tensors)
        start = 0
        for p in params:
            p.data = stacked[start : start + p.shape[0]]
            start += p.shape[0]
    return stacked


def stack_linears(linears: list[nn.Linear]) -> tuple[Tensor, Tensor | None]:
    """Weight (and bias, None if none of them has one) of the linears' outputs concatenated in order."""
    weight = _stack([m.weight for m in linears])
    biases = [m.bias for m in linears]
    if all(b is None for b in biases):
        return weight, None
    if any(b is None for b in biases):  # a mix (not seen in supported models): zeros stand in for the missing
        return weight, torch.cat([b.data if b is not None else m.weight.new_zeros(m.out_features)
                                  for b, m in zip(biases, linears)])
    return weight, _stack(biases)  # type: ignore[arg-type]
