"""Quantized pages: they hold exactly the codecs' codes, the reference attends like dense attention over the
dequantized tokens plus the ring, and the Triton kernel matches the reference (interpreter on CPU)."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import kvslim
from interpreted import run_interpreted
from kvslim.cache.fp8 import ScaledFloat8, static_scales
from kvslim.kernels.paged_quant import CodePages, Codes, QuantPages
from kvslim.kernels.paged_quant_attention_ref import paged_quant_decode_ref

#: every page format with its default groups (KIVI: runs of 32 slots, one per block; int4: 32 channels)
SPECS = ["kivi4", "kivi2", "int8", "int4", "fp8"]
NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, Q_HEADS, DIM = 12, 32, 2, 4, 32


def _pool(spec: str, seed: int) -> tuple[QuantPages, torch.Tensor, torch.Tensor]:
    """Pages of one layer whose every slot holds a random token; and the tokens as the codecs decode them (N, bs, H, D)."""
    quantizer = kvslim.policy(spec)
    encoders = quantizer.encoders(DIM, DIM)
    gen = torch.Generator().manual_seed(seed)
    slots = NUM_BLOCKS * BLOCK_SIZE
    pages, decoded = [], []
    for encode in encoders:
        rows = torch.randn(KV_HEADS * slots, DIM, generator=gen) * 3  # head-major: a head's slots in order
        codec = encode(rows)
        code_pages = CodePages.allocate(Codes.of(codec, DIM), 1, NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, DIM, torch.device("cpu"))
        code_pages.write(0, torch.arange(slots).repeat(KV_HEADS), torch.arange(KV_HEADS).repeat_interleave(slots), codec)
        pages.append(code_pages)
        decoded.append(codec.decode().view(KV_HEADS, NUM_BLOCKS, BLOCK_SIZE, DIM).permute(1, 2, 0, 3))
    return QuantPages(*pages).layer(0), decoded[0], decoded[1]


def _case(spec: str, seed: int, dtype: torch.dtype):
    """3 sequences: ragged heads, one with a sliding window whose passed block was handed back; rings of 0-5 tokens."""
    pages, _, _ = _pool(spec, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    tables = torch.randperm(NUM_BLOCKS, generator=gen).view(3, 4).int()
    tables[2, 1] = -1
    lens = torch.tensor([[3 * BLOCK_SIZE + 1, 2 * BLOCK_SIZE], [0, 9], [4 * BLOCK_SIZE, 4 * BLOCK_SIZE]])
    starts = torch.tensor([0, 0, 2 * BLOCK_SIZE + 3])
    sinks = torch.tensor([0, 0, 2])
    ring_k, ring_v = (torch.randn(5, 6, KV_HEADS, DIM, generator=gen).to(dtype) for _ in range(2))
    rows = torch.tensor([4, 0, 2])
    ring_lens = torch.tensor([[1, 5], [3, 0], [6, 1]])
    query = torch.randn(3, Q_HEADS, DIM, generator=gen).to(dtype)
    return query, pages, tables, lens, starts, sinks, ring_k, ring_v, rows, ring_lens


@pytest.mark.parametrize("spec", SPECS)
def test_pages_hold_the_codecs_codes_and_bytes(spec: str) -> None:
    pages, keys, values = _pool(spec, 0)
    blocks = torch.arange(NUM_BLOCKS)
    assert torch.equal(pages.keys.dequantize(blocks), keys)
    assert torch.equal(pages.values.dequantize(blocks), values)
    stored = sum(t.numel() * t.element_size() for t in pages.tensors())
    assert stored == kvslim.policy(spec).packed_bytes(NUM_BLOCKS * BLOCK_SIZE, DIM) * KV_HEADS  # the HF path's count


@pytest.mark.parametrize("spec", SPECS)
def test_reference_matches_dense_attention_over_pages_and_ring(spec: str) -> None:
    query, pages, tables, lens, starts, sinks, ring_k, ring_v, rows, ring_lens = _case(spec, 3, torch.float32)
    _, keys, values = _pool(spec, 3)
    got = paged_quant_decode_ref(query, pages, tables, lens, starts, sinks, ring_k, ring_v, rows, ring_lens, 0.25)
    group = Q_HEADS // KV_HEADS
    for b in range(3):
        for h in range(KV_HEADS):
            slots = [s for s in range(int(lens[b, h])) if s < sinks[b] or s >= starts[b]]
            where = [(int(tables[b, s // BLOCK_SIZE]), s % BLOCK_SIZE) for s in slots]
            ring = range(int(ring_lens[b, h]))
            k = torch.stack([keys[blk, s, h] for blk, s in where] + [ring_k[rows[b], r, h] for r in ring])
            v = torch.stack([values[blk, s, h] for blk, s in where] + [ring_v[rows[b], r, h] for r in ring])
            q = query[b, h * group : (h + 1) * group]
            want = F.scaled_dot_product_attention(q[None], k[None], v[None], scale=0.25)[0]
            torch.testing.assert_close(got[b, h * group : (h + 1) * group], want, atol=1e-5, rtol=1e-5)


def check_triton_kernel(spec: str, dtype: torch.dtype) -> None:
    from kvslim.kernels.paged_quant_attention import paged_quant_decode, triton_supports

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    query, pages, *rest = _case(spec, 5, dtype)
    assert triton_supports(pages.keys.spec, pages.values.spec), f"{spec}: the engine would not use this kernel"
    pages = QuantPages(*(CodePages(*(None if t is None else t.to(device) for t in (p.codes, p.scale, p.zero)), p.spec)
                         for p in (pages.keys, pages.values)))
    args = [query.to(device), pages, *(t.to(device) for t in rest)]
    want = paged_quant_decode_ref(*args, scale=0.25).float()
    for splits in (None, 3):  # as many as fill the device; the blocks shared by several programs, then merged
        out = paged_quant_decode(*args, scale=0.25, splits=splits).float()
        # bf16: both round the dequantized tokens to bf16, but the interpreter truncates where a GPU rounds
        # to nearest (twice the error); float32: the GPU's tf32 products
        error = float((out - want).norm() / want.norm())
        bf16 = 1e-2 if device.type == "cuda" else 2e-2
        assert error < (bf16 if dtype == torch.bfloat16 else 2e-3), f"{spec} {dtype} splits={splits}: error {error:.2e}"


DTYPES = (torch.bfloat16, torch.float32)


def test_triton_kernel_matches_reference() -> None:
    """Every format, bf16 and float32. On a GPU in process; on a CPU in a child process under Triton's
    interpreter, which must be switched on before Triton is first imported."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        for spec in SPECS:
            for dtype in DTYPES:
                check_triton_kernel(spec, dtype)
        return
    run_interpreted(__file__)


if __name__ == "__main__":
    torch.set_num_threads(1)
    for spec in SPECS:
        for dtype in DTYPES:
            check_triton_kernel(spec, dtype)


@pytest.mark.parametrize("spec", ["fp8_e4m3", "fp8_e5m2(scale=per-head)"])
def test_static_fp8_pages_dequantize_as_the_cache_codec_and_count_their_scales(spec: str) -> None:
    """A sequence's tokens in pages (each block with the sequence's scale) give back what kvslim.Cache's codec does."""
    method = kvslim.policy(spec)
    slots = NUM_BLOCKS * BLOCK_SIZE
    tokens = torch.randn(1, KV_HEADS, slots, DIM, generator=torch.Generator().manual_seed(6)) * 3
    scale = static_scales(tokens, torch.ones(tokens.shape[:3], dtype=torch.bool), method.per_head, method.fmt)
    row_heads = torch.arange(KV_HEADS).repeat_interleave(slots)  # one sequence: flat head index = head
    codec = ScaledFloat8.encode(tokens.flatten(0, 2), row_heads, scale, KV_HEADS, method.fmt)
    codes = Codes.static_fp8(method.fmt, method.per_head, DIM)
    pages = CodePages.allocate(codes, 1, NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, DIM, torch.device("cpu"))
    pages.write_static(0, torch.arange(slots).repeat(KV_HEADS), row_heads, codec.codes,
                       codec.row_scale(row_heads))
    want = codec.decode(row_heads).view(KV_HEADS, NUM_BLOCKS, BLOCK_SIZE, DIM).permute(1, 2, 0, 3)
    assert torch.equal(pages.layer(0).dequantize(torch.arange(NUM_BLOCKS)), want)
    scales = KV_HEADS if method.per_head else 1
    assert sum(t.numel() * t.element_size() for t in pages.tensors()) == slots * KV_HEADS * DIM + NUM_BLOCKS * scales * 4
    assert codes.block_bytes(BLOCK_SIZE, KV_HEADS, DIM) == BLOCK_SIZE * KV_HEADS * DIM + scales * 4
