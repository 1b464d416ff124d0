"""Zero-copy gather: GPU programs read the selected rows straight out of pinned host memory.

Offloading methods fetch a few thousand scattered rows per layer and step (KCache's top-N values,
PQCache's top-k keys and values). The staged path (:func:`kvslim.cache.offload.copy_rows`) must bring
the row numbers back to the host first, which stalls the stream once per layer, gathers on the CPU and
then copies. Pinned memory from CUDA's host allocator is mapped into the device's address space (unified
virtual addressing), so a kernel can load the rows over PCIe itself: no synchronisation, no staging
buffer, and the launch queues behind the top-N selection like any other kernel.

Not every platform maps pinned memory for kernels (virtualised hosts may not), so :func:`zero_copy_works`
probes once per process and callers keep the staged path as the fallback.
"""
from __future__ import annotations

from functools import cache

import torch
import triton
import triton.language as tl
from torch import Tensor

ROWS_PER_PROGRAM = 16


@triton.jit
def _gather_kernel(src_ptr, index_ptr, out_ptr, n_rows, ROW: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = rows < n_rows
    source = tl.load(index_ptr + rows, mask=live, other=0).to(tl.int64)
    cols = tl.arange(0, ROW)
    values = tl.load(src_ptr + source[:, None] * ROW + cols[None, :], mask=live[:, None])
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * ROW + cols[None, :], values, mask=live[:, None])


def supports(host: Tensor) -> bool:
    """Rows of a power-of-two width (a Triton block) in a contiguous 2-D tensor."""
    width = host.shape[-1]
    return host.dim() == 2 and host.is_contiguous() and width > 0 and width & (width - 1) == 0


def gather_rows(host: Tensor, index: Tensor, device: torch.device) -> Tensor:
    """Rows ``index`` (any shape, on ``device``) of a pinned 2-D ``host`` tensor, as a (N, width) tensor on ``device``."""
    index = index.reshape(-1)
    out = torch.empty((index.numel(), host.shape[1]), dtype=host.dtype, device=device)
    if index.numel():
        grid = (triton.cdiv(index.numel(), ROWS_PER_PROGRAM),)
        _gather_kernel[grid](host, index, out, index.numel(), ROW=host.shape[1], BLOCK=ROWS_PER_PROGRAM)
    return out


@cache
def zero_copy_works(device: torch.device) -> bool:
    """Whether kernels on ``device`` read pinned host memory here: one small gather, checked against the CPU's."""
    host = torch.arange(64 * 32, dtype=torch.float32).view(64, 32).pin_memory()
    index = torch.tensor([5, 0, 63, 5], device=device)
    try:
        out = gather_rows(host, index, device).cpu()
    except Exception:  # noqa: BLE001 - any refusal (pointer not mapped, launch error) means: use the staged path
        return False
    return bool(torch.equal(out, host[index.cpu()]))
