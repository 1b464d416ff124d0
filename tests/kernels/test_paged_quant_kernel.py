"""The Triton paged decode kernel over quantized pages matches its PyTorch reference for every page format.

Every format the engine stores (kivi2/kivi4 with key runs and value groups of 32 and 16, int8 and int4
with groups of 16 to 128, fp8, and vLLM's fp8_e4m3/fp8_e5m2 with a static scale per block or per block and
head), GQA groups of 3 and 4, ragged per-head lengths (empty heads, a sliding window whose passed block was
handed back, rings of 0 to 6 tokens) and several splits. On a GPU the whole sweep runs in process
(``GPU_SHAPES``); on a CPU the groups of 16, the formats the H100 once got wrong, and the static fp8 formats
run at small sizes under Triton's interpreter in a child process.
"""
from __future__ import annotations


import pytest
import torch

import kvslim
from interpreted import run_interpreted
from kvslim.cache.fp8 import to_fp8
from kvslim.kernels.paged_quant import CodePages, Codes, QuantPages
from kvslim.kernels.paged_quant_attention_ref import paged_quant_decode_ref
from kvslim.methods.fp8_static import StaticFP8

FORMATS = ["kivi2", "kivi4", "kivi2(group=16)", "kivi4(group=16)", "int8", "int8(group=16)", "int4",
           "int4(group=16)", "int4(group=64)", "fp8", "fp8_e4m3", "fp8_e5m2(scale=per-head)"]
INTERPRETED = ["kivi2(group=16)", "int4(group=16)", "int8(group=16)", "fp8_e4m3", "fp8_e5m2(scale=per-head)"]
BATCH, MAX_BLOCKS = 4, 5
#: (head_dim, block_size, KV heads, query heads per KV head): SmolLM2's heads, Llama-3's, a 32-slot block, and
#: tiny heads whose sub-byte planes are narrower than 16 channels (products without tensor cores)
GPU_SHAPES = ((64, 16, 3, 3), (128, 16, 2, 4), (128, 32, 2, 4), (32, 16, 2, 4), (16, 32, 1, 4))


def _pages(spec: str, num_blocks: int, block_size: int, kv_heads: int, dim: int, device: str,
           gen: torch.Generator) -> QuantPages:
    """One layer's pages, every slot a random token (with an outlier key channel) coded by ``spec``'s encoders."""
    slots = num_blocks * block_size
    method = kvslim.policy(spec)
    if isinstance(method, StaticFP8):
        return _static_pages(method, num_blocks, block_size, kv_heads, dim, device, gen)
    pages = []
    for encode in method.encoders(dim, dim):
        rows = torch.randn(kv_heads * slots, dim, generator=gen) * 2  # head-major: a head's slots in order
        rows[:, 3] += 5.0
        codec = encode(rows.to(device))
        code_pages = CodePages.allocate(Codes.of(codec, dim), 1, num_blocks, block_size, kv_heads, dim, torch.device(device))
        heads = torch.arange(kv_heads, device=device).repeat_interleave(slots)
        code_pages.write(0, torch.arange(slots, device=device).repeat(kv_heads), heads, codec)
        pages.append(code_pages)
    return QuantPages(*pages).layer(0)


def _static_pages(method: StaticFP8, num_blocks: int, block_size: int, kv_heads: int, dim: int, device: str,
                  gen: torch.Generator) -> QuantPages:
    """Static fp8 pages: each block coded under its own random scale (per head with scale=per-head), values past
    the format's range clamped, as the engine codes a sequence's decoded tokens."""
    slots = num_blocks * block_size
    codes = Codes.static_fp8(method.fmt, method.per_head, dim)
    pages = []
    for _ in range(2):
        rows = torch.randn(kv_heads * slots, dim, generator=gen) * 2
        rows[:, 3] += 5.0
        block_scales = torch.rand(num_blocks, kv_heads if method.per_head else 1, generator=gen) * 0.02 + 0.005
        heads = torch.arange(kv_heads).repeat_interleave(slots)
        slot = torch.arange(slots).repeat(kv_heads)
        row_scale = block_scales[slot // block_size, heads if method.per_head else 0]
        code_pages = CodePages.allocate(codes, 1, num_blocks, block_size, kv_heads, dim, torch.device(device))
        code_pages.write_static(0, slot.to(device), heads.to(device), to_fp8(rows, row_scale, method.fmt).to(device),
                                row_scale.to(device))
        pages.append(code_pages)
    return QuantPages(*pages).layer(0)


def _case(spec: str, block_size: int, kv_heads: int, group: int, dim: int, dtype: torch.dtype, device: str, seed: int):
    """Four sequences of ragged heads over shuffled blocks; the third slides past its second block."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = BATCH * MAX_BLOCKS
    pages = _pages(spec, num_blocks, block_size, kv_heads, dim, device, gen)
    tables = torch.randperm(num_blocks, generator=gen).view(BATCH, MAX_BLOCKS).int()
    tables[2, 1] = -1
    full = MAX_BLOCKS * block_size
    lens = torch.randint(0, full + 1, (BATCH, kv_heads), generator=gen)
    lens[0, 0], lens[1] = 0, full
    lens[2] = torch.randint(3 * block_size, full + 1, (kv_heads,), generator=gen)
    starts = torch.tensor([0, 0, 2 * block_size + 3, 0])
    sinks = torch.tensor([0, 0, 2, 0])
    ring_k, ring_v = (torch.randn(BATCH + 1, 7, kv_heads, dim, generator=gen).to(dtype) for _ in range(2))
    rows = torch.randperm(BATCH + 1, generator=gen)[:BATCH]
    ring_lens = torch.randint(0, 7, (BATCH, kv_heads), generator=gen)
    ring_lens[0, 0] = 1  # a head with no page slot still attends to its ring
    query = torch.randn(BATCH, kv_heads * group, dim, generator=gen).to(dtype)
    rest = (tables, lens, starts, sinks, ring_k, ring_v, rows, ring_lens)
    return [query.to(device), pages, *(t.to(device) for t in rest)]


def check(spec: str, block_size: int, kv_heads: int, group: int, dim: int, dtype: torch.dtype, device: str) -> None:
    from kvslim.kernels.paged_quant_attention import paged_quant_decode, triton_supports

    args = _case(spec, block_size, kv_heads, group, dim, dtype, device, seed=len(spec) + block_size + dim)
    assert triton_supports(args[1].keys.spec, args[1].values.spec), f"{spec}: the engine would not use this kernel"
    want = paged_quant_decode_ref(*args, scale=dim**-0.5).float()
    for splits in (None, 1, 3):
        out = paged_quant_decode(*args, scale=dim**-0.5, splits=splits).float()
        assert torch.isfinite(out).all()
        # both round the dequantized tokens to bf16, but the interpreter truncates where a GPU rounds to
        # nearest (twice the error); float32: the GPU's tf32 products
        error = float((out - want).norm() / want.norm())
        limit = (1e-2 if device == "cuda" else 2e-2) if dtype == torch.bfloat16 else 2e-3
        assert error < limit, f"{spec} bs={block_size} D={dim} G={group} {dtype} splits={splits}: error {error:.2e}"


def _fits(spec: str, block_size: int) -> bool:
    """KIVI key runs must not straddle blocks."""
    return block_size % kvslim.policy(spec).block() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the full sweep needs a GPU; the CPU runs test_interpreted_group_16")
@pytest.mark.parametrize("spec", FORMATS)
def test_kernel_matches_reference_on_gpu(spec: str) -> None:
    pytest.importorskip("triton")
    for dim, block_size, kv_heads, group in GPU_SHAPES:
        if _fits(spec, block_size):
            for dtype in (torch.bfloat16, torch.float32):
                check(spec, block_size, kv_heads, group, dim, dtype, "cuda")


def test_interpreted_group_16() -> None:
    """Groups of 16, and vLLM's static-scale fp8 formats, under Triton's interpreter, which must be on before Triton is
    first imported: a child process."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("the GPU runs the full sweep")
    run_interpreted(__file__)


if __name__ == "__main__":
    torch.set_num_threads(1)
    for spec in INTERPRETED:
        check(spec, 16, 2, 3, 32, torch.bfloat16, "cpu")
