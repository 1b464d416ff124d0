"""Paged decode attention kernels against their bytes: model-dtype pages vs quantized pages.

One layer of a Llama-3.1-8B-shaped model (8 KV heads, 32 query heads, head_dim 128, bf16): ``--batch``
sequences of ``--context`` tokens each in shuffled blocks. Each kernel is timed with CUDA events
(``triton.testing.do_bench``, median) and set against the bytes it must read (every page once, plus
the queries and outputs) over the device-to-device copy bandwidth measured here, and checked against
the PyTorch reference on the same inputs.

    python benchmarks/engine_decode_kernels.py --batch 4 16 --context 16384
    python benchmarks/engine_decode_kernels.py --sweep --batch 4 16 32 --context 8192 32768 --out sweep.json
    python benchmarks/engine_decode_kernels.py --sweep-formats kivi4 kivi2 int8 fp8 --batch 4 32 --context 8192 32768

``--sweep`` times the bf16 kernel over its launch shapes (tokens per loop step, warps, pipeline stages)
instead, to choose the defaults; ``--sweep-formats`` does the same for the quantized kernel in each format
(``--tiles``, ``--warps``, ``--stages``, ``--programs-per-sm``, ``--max-registers``: its grid), each point's
ms against the bytes of its pages, into the same ``--out`` JSON (rewritten after every shape). Each launch
shape but the programs per multiprocessor compiles the kernel once (seconds): the grid's size sets the time.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
from collections.abc import Callable

import torch
import triton
from timing import copy_bandwidth

import kvslim
from kvslim.kernels.paged_attention import paged_decode
from kvslim.kernels.paged_attention_ref import paged_decode_ref
from kvslim.kernels.paged_quant import CodePages, Codes, QuantPages
from kvslim.kernels.paged_quant_attention import paged_quant_decode
from kvslim.kernels.paged_quant_attention_ref import paged_quant_decode_ref

KV_HEADS, Q_HEADS, DIM = 8, 32, 128


def quant_pages(spec: str, num_blocks: int, block_size: int) -> QuantPages:
    """Pages whose every slot holds a random token coded by ``spec``'s encoders (one layer)."""
    quantizer = kvslim.policy(spec)
    pages = []
    slots = num_blocks * block_size
    for encode in quantizer.encoders(DIM, DIM):
        codec = encode(torch.randn(KV_HEADS * slots, DIM, device="cuda", dtype=torch.bfloat16))
        code_pages = CodePages.allocate(Codes.of(codec, DIM), 1, num_blocks, block_size, KV_HEADS, DIM, torch.device("cuda"))
        heads = torch.arange(KV_HEADS, device="cuda").repeat_interleave(slots)
        code_pages.write(0, torch.arange(slots, device="cuda").repeat(KV_HEADS), heads, codec)
        pages.append(code_pages)
    return QuantPages(*pages).layer(0)


def sweep(batches: list[int], contexts: list[int], bandwidth: float) -> list[dict]:
    """The bf16 kernel at every launch shape, each point against its byte floor."""
    rows = []
    for context in contexts:
        for batch in batches:
            per_seq = context // 16
            tables = torch.randperm(batch * per_seq, device="cuda").view(batch, per_seq).int()
            lens = torch.full((batch, KV_HEADS), context, device="cuda")
            zeros = torch.zeros(batch, dtype=torch.int32, device="cuda")
            query = torch.randn(batch, Q_HEADS, DIM, device="cuda", dtype=torch.bfloat16)
            shape = (batch * per_seq, 16, KV_HEADS, DIM)
            k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            call = (query, k, v, tables, lens, zeros, zeros, DIM**-0.5)
            want = paged_decode_ref(*call).float() if batch * context <= 16 * 8192 else None
            floor_ms = 2 * k.numel() * 2 / bandwidth * 1e3
            for tile in (16, 32, 64, 128):
                for warps in (4, 8):
                    for stages in (1, 2, 3):
                        shape_kw = dict(tile_tokens=tile, num_warps=warps, num_stages=stages)
                        try:
                            ms = triton.testing.do_bench(lambda: paged_decode(*call, **shape_kw), return_mode="median")
                            error = None if want is None else float((paged_decode(*call, **shape_kw).float() - want).norm() / want.norm())
                        except Exception as err:  # a shape that does not compile (shared memory) is a result too
                            rows.append({"format": "bf16", "batch": batch, "context": context, **shape_kw,
                                         "error": str(err)[:200]})
                            continue
                        rows.append({"format": "bf16", "batch": batch, "context": context, **shape_kw, "ms": ms,
                                     "floor_ms": floor_ms,
                                     "floor_fraction": floor_ms / ms, "rel_error": error})
                        print(json.dumps(rows[-1]), flush=True)
            del call, k, v
            torch.cuda.empty_cache()
    return rows


def quant_case(spec: str, batch: int, context: int) -> tuple[tuple, int]:
    """The quantized kernel's arguments for ``batch`` sequences of ``context`` tokens in shuffled blocks (32 slots for
    KIVI, 16 otherwise, as the engine), one ring token each; and the bytes of the pages."""
    block_size = 32 if spec.startswith("kivi") else 16
    per_seq = context // block_size
    tables = torch.randperm(batch * per_seq, device="cuda").view(batch, per_seq).int()
    lens = torch.full((batch, KV_HEADS), context, device="cuda")
    zeros = torch.zeros(batch, dtype=torch.int32, device="cuda")
    query = torch.randn(batch, Q_HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    pages = quant_pages(spec, batch * per_seq, block_size)
    ring = torch.randn(1, 1, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    rows, ring_lens = torch.zeros(batch, dtype=torch.long, device="cuda"), torch.ones_like(lens)
    call = (query, pages, tables, lens, zeros, zeros, ring, ring, rows, ring_lens, DIM**-0.5)
    return call, sum(t.numel() * t.element_size() for t in pages.tensors())


def sweep_quant(formats: list[str], batches: list[int], contexts: list[int], grid: dict[str, list],
                bandwidth: float, rows: list[dict], save: Callable[[], None]) -> None:
    """The quantized kernel of each format at every launch shape of ``grid``, each point against its byte floor;
    checked against the reference where that fits (``rel_error``). ``save`` is called after every shape, so an
    interrupted sweep keeps what it timed."""
    for spec in formats:
        for context in contexts:
            for batch in batches:
                call, page_bytes = quant_case(spec, batch, context)
                want = paged_quant_decode_ref(*call).float() if batch * context <= 4 * 32768 else None
                floor_ms = page_bytes / bandwidth * 1e3
                for values in itertools.product(*grid.values()):
                    shape_kw = dict(zip(grid, values))
                    point = {"format": spec, "batch": batch, "context": context, **shape_kw}
                    run = functools.partial(paged_quant_decode, *call, **shape_kw)
                    try:
                        out = run().float()
                        ms = triton.testing.do_bench(run, warmup=10, rep=40, return_mode="median")
                    except Exception as err:  # noqa: BLE001  (a shape that does not compile is a result too)
                        rows.append({**point, "error": str(err)[:200]})
                        print(json.dumps(rows[-1]), flush=True)
                        continue
                    error = None if want is None else float((out - want).norm() / want.norm())
                    rows.append({**point, "ms": ms, "bytes": page_bytes, "floor_ms": floor_ms,
                                 "floor_fraction": floor_ms / ms, "rel_error": error})
                    print(json.dumps(rows[-1]), flush=True)
                del call, run, want
                torch.cuda.empty_cache()
                save()
        best = {}
        for r in rows:
            if r.get("format") == spec and "ms" in r:
                key = (r["batch"], r["context"])
                best[key] = max(best.get(key, r), r, key=lambda x: x["floor_fraction"])
        for (batch, context), r in sorted(best.items()):
            launch = " ".join(f"{key} {r[key]}" for key in grid)
            print(f"best {spec} batch {batch} context {context}: {launch}: {r['ms']:.3f} ms, "
                  f"{r['floor_fraction']:.2f} of the floor", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--context", type=int, nargs="+", default=[16384])
    parser.add_argument("--formats", nargs="+", default=["kivi4", "kivi2", "int8", "fp8"])
    parser.add_argument("--sweep", action="store_true", help="bf16 kernel over launch shapes (see the module doc)")
    parser.add_argument("--sweep-formats", nargs="+", default=None,
                        help="quantized kernel over launch shapes in these formats (with --sweep: after bf16)")
    parser.add_argument("--tiles", type=int, nargs="+", default=[32, 64, 128], help="--sweep-formats: tokens a step")
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8], help="--sweep-formats: warps a program")
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3], help="--sweep-formats: pipeline stages")
    parser.add_argument("--programs-per-sm", type=int, nargs="+", default=[4, 8],
                        help="--sweep-formats: programs per multiprocessor (sets the splits)")
    parser.add_argument("--max-registers", type=int, nargs="+", default=[0],
                        help="--sweep-formats: cap on registers per thread (0: none, as ptxas likes)")
    parser.add_argument("--out", default=None, help="also write the rows here as JSON")
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    if args.sweep or args.sweep_formats:
        rows = sweep(args.batch, args.context, bandwidth) if args.sweep else []

        def save() -> None:
            if args.out:
                with open(args.out, "w") as f:
                    json.dump({"device": torch.cuda.get_device_name(), "triton": triton.__version__,
                               "copy_bandwidth_bytes_per_s": bandwidth, "rows": rows}, f, indent=2)

        save()
        if args.sweep_formats:
            grid = {"tile_tokens": args.tiles, "num_warps": args.warps, "num_stages": args.stages,
                    "programs_per_sm": args.programs_per_sm, "max_registers": [r or None for r in args.max_registers]}
            sweep_quant(args.sweep_formats, args.batch, args.context, grid, bandwidth, rows, save)
        return
    args.context = args.context[0]
    rows = []
    for batch in args.batch:
        for spec in ["bf16", *args.formats]:
            block_size = 32 if spec.startswith("kivi") else 16
            per_seq = args.context // block_size
            tables = torch.randperm(batch * per_seq, device="cuda").view(batch, per_seq).int()
            lens = torch.full((batch, KV_HEADS), args.context, device="cuda")
            zeros = torch.zeros(batch, dtype=torch.int32, device="cuda")
            query = torch.randn(batch, Q_HEADS, DIM, device="cuda", dtype=torch.bfloat16)
            if spec == "bf16":
                shape = (batch * per_seq, block_size, KV_HEADS, DIM)
                k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(2))
                call = (query, k, v, tables, lens, zeros, zeros, DIM**-0.5)
                kernel, reference, page_bytes = paged_decode, paged_decode_ref, 2 * k.numel() * 2
            else:
                pages = quant_pages(spec, batch * per_seq, block_size)
                ring = torch.randn(1, 1, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16)
                rows_, ring_lens = torch.zeros(batch, dtype=torch.long, device="cuda"), torch.ones_like(lens)
                call = (query, pages, tables, lens, zeros, zeros, ring, ring, rows_, ring_lens, DIM**-0.5)
                kernel, reference = paged_quant_decode, paged_quant_decode_ref
                page_bytes = sum(t.numel() * t.element_size() for t in pages.tensors())
            out, want = kernel(*call).float(), reference(*call).float()
            error = float((out - want).norm() / want.norm())
            ms = triton.testing.do_bench(lambda: kernel(*call), return_mode="median")
            floor_ms = page_bytes / bandwidth * 1e3
            rows.append({"batch": batch, "context": args.context, "format": spec, "block_size": block_size, "ms": ms,
                         "bytes": page_bytes, "floor_ms": floor_ms, "floor_fraction": floor_ms / ms, "rel_error": error})
            print(json.dumps(rows[-1]), flush=True)
            del call
            torch.cuda.empty_cache()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)")
    print(f"{'batch':>5} {'format':>6} {'ms':>8} {'floor ms':>9} {'of floor':>8} {'rel err':>8}")
    for r in rows:
        print(f"{r['batch']:>5} {r['format']:>6} {r['ms']:8.3f} {r['floor_ms']:9.3f} {r['floor_fraction']:8.2f} {r['rel_error']:8.1e}")
    print("median fraction of floor:", statistics.median(r["floor_fraction"] for r in rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"copy_bandwidth_bytes_per_s": bandwidth, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
