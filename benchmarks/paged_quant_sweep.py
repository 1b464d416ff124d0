r"""Sweep the quantized paged decode kernel's launch (tile of blocks, warps, stages, programs per SM) on a GPU.

One layer of a Llama-3.1-8B-shaped model (8 KV heads, 32 query heads, head_dim 128, bf16 query), ``batch``
sequences of ``context`` tokens in shuffled blocks (32 slots for KIVI, 16 otherwise, as the engine). Every
variant is checked against the PyTorch reference on fresh random pages (relative error, output poisoned
first) and timed with ``triton.testing.do_bench`` (median); GB/s counts the pages' bytes (read once) against
a device-to-device copy (bytes read plus written). ``--old`` times a copy of a previous kernel beside it, e.g.
``git show f4a00e9:src/kvslim/kernels/paged_quant_attention.py | sed 's/^from \./from kvslim.kernels./'
> benchmarks/paged_quant_old.py``.

    PYTHONPATH=src python benchmarks/paged_quant_sweep.py --out sweep.json
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
from pathlib import Path

import torch
import triton
from timing import copy_bandwidth
from triton.testing import do_bench

import kvslim
from kvslim.cache.fp8 import FP8_FORMATS, to_fp8
from kvslim.kernels.paged_attention import paged_decode
from kvslim.kernels.paged_quant import CodePages, Codes, QuantPages
from kvslim.kernels.paged_quant_attention import paged_quant_decode
from kvslim.kernels.paged_quant_attention_ref import paged_quant_decode_ref
from kvslim.methods.fp8_static import StaticFP8

KV_HEADS, Q_HEADS, DIM = 8, 32, 128


def static_fp8_pages(method: StaticFP8, num_blocks: int, block_size: int) -> QuantPages:
    """vLLM's fp8_e4m3/fp8_e5m2: each block under one scale (per head with scale=per-head), as the engine writes."""
    pages = []
    slots = num_blocks * block_size
    codes = Codes.static_fp8(method.fmt, method.per_head, DIM)
    heads = torch.arange(KV_HEADS, device="cuda").repeat_interleave(slots)
    slot = torch.arange(slots, device="cuda").repeat(KV_HEADS)
    for _ in range(2):
        rows = torch.randn(KV_HEADS * slots, DIM, device="cuda", dtype=torch.bfloat16)
        rows[:, 3] += 4.0
        scale = torch.full((num_blocks, KV_HEADS if method.per_head else 1), 8.0 / FP8_FORMATS[method.fmt][1],
                           device="cuda")
        row_scale = scale[slot // block_size, heads if method.per_head else 0]
        code_pages = CodePages.allocate(codes, 1, num_blocks, block_size, KV_HEADS, DIM, torch.device("cuda"))
        code_pages.write_static(0, slot, heads, to_fp8(rows, row_scale, method.fmt), row_scale)
        del rows
        pages.append(code_pages)
    return QuantPages(*pages).layer(0)


def quant_pages(spec: str, num_blocks: int, block_size: int) -> QuantPages:
    method = kvslim.policy(spec)
    if isinstance(method, StaticFP8):
        return static_fp8_pages(method, num_blocks, block_size)
    pages = []
    slots = num_blocks * block_size
    for encode in method.encoders(DIM, DIM):
        rows = torch.randn(KV_HEADS * slots, DIM, device="cuda", dtype=torch.bfloat16)
        rows[:, 3] += 4.0
        codec = encode(rows)
        del rows
        code_pages = CodePages.allocate(Codes.of(codec, DIM), 1, num_blocks, block_size, KV_HEADS, DIM, torch.device("cuda"))
        heads = torch.arange(KV_HEADS, device="cuda").repeat_interleave(slots)
        code_pages.write(0, torch.arange(slots, device="cuda").repeat(KV_HEADS), heads, codec)
        pages.append(code_pages)
    return QuantPages(*pages).layer(0)


def case(spec: str, batch: int, context: int):
    block_size = 32 if spec.startswith("kivi") else 16
    per_seq = context // block_size
    tables = torch.randperm(batch * per_seq, device="cuda").view(batch, per_seq).int()
    lens = torch.full((batch, KV_HEADS), context, device="cuda")
    lens[0] -= 7  # a ragged tail
    zeros = torch.zeros(batch, dtype=torch.int32, device="cuda")
    query = torch.randn(batch, Q_HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    pages = quant_pages(spec, batch * per_seq, block_size)
    ring = torch.randn(batch, 4, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    ring_v = torch.randn_like(ring)
    rows = torch.arange(batch, device="cuda")
    ring_lens = torch.randint(0, 4, (batch, KV_HEADS), device="cuda")
    args = (query, pages, tables, lens, zeros, zeros, ring, ring_v, rows, ring_lens, DIM**-0.5)
    return args, sum(t.numel() * t.element_size() for t in pages.tensors())


def rel(out: torch.Tensor, want: torch.Tensor) -> float:
    out = out.float()
    return float("nan") if not torch.isfinite(out).all() else float((out - want).norm() / want.norm())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--formats", nargs="+", default=["kivi4", "kivi2", "int8", "int4", "fp8"],
                        help="also fp8_e4m3, fp8_e5m2, fp8_e5m2(scale=per-head) (vLLM's static-scale formats)")
    parser.add_argument("--shapes", nargs="+", default=["14x20480", "32x8192", "4x32768", "16x8192"])
    parser.add_argument("--sweep-shapes", nargs="+", default=["14x20480", "32x8192"])
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--ppsm", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--old", default=str(Path(__file__).with_name("paged_quant_old.py")))
    parser.add_argument("--out", default="paged_quant_sweep.json")
    a = parser.parse_args()
    old = None
    if Path(a.old).exists():
        spec_ = importlib.util.spec_from_file_location("paged_quant_old", a.old)
        old = importlib.util.module_from_spec(spec_)
        spec_.loader.exec_module(old)
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "copy_GBps": bw / 1e9, "rows": []}
    bench = lambda f: do_bench(f, warmup=10, rep=50, return_mode="median")
    for shape in a.shapes:
        batch, context = map(int, shape.split("x"))
        if shape == a.shapes[0]:  # the model-dtype kernel at the engine's shape, for scale
            per_seq = context // 16
            tables = torch.randperm(batch * per_seq, device="cuda").view(batch, per_seq).int()
            k, v = (torch.randn(batch * per_seq, 16, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            lens = torch.full((batch, KV_HEADS), context, device="cuda")
            z = torch.zeros(batch, dtype=torch.int32, device="cuda")
            q = torch.randn(batch, Q_HEADS, DIM, device="cuda", dtype=torch.bfloat16)
            ms = bench(lambda: paged_decode(q, k, v, tables, lens, z, z, DIM**-0.5))
            nbytes = 2 * k.numel() * 2
            result["rows"].append({"format": "bf16", "batch": batch, "context": context, "variant": "paged_decode",
                                   "ms": ms, "bytes": nbytes, "GBps": nbytes / ms / 1e6})
            print(json.dumps(result["rows"][-1]), flush=True)
            del k, v
        for fmt in a.formats:
            args, nbytes = case(fmt, batch, context)
            want = paged_quant_decode_ref(*args).float()
            block_size = args[1].keys.codes.shape[1]
            variants = {"default": {}}
            if shape in a.sweep_shapes:
                for blocks, warps, stages, ppsm in itertools.product(a.blocks, a.warps, a.stages, a.ppsm):
                    variants[f"b{blocks}w{warps}s{stages}p{ppsm}"] = dict(
                        tile_tokens=blocks * block_size, num_warps=warps, num_stages=stages, programs_per_sm=ppsm)
            runs = {}
            if old is not None:
                runs["old"] = lambda: old.paged_quant_decode(*args)
            for name, launch in variants.items():
                runs[name] = lambda launch=launch: paged_quant_decode(*args, **launch)
            for name, fn in runs.items():
                try:
                    err = rel(fn(), want)
                    ms = bench(fn)
                except Exception as exc:  # noqa: BLE001  (a launch out of resources)
                    print(fmt, shape, name, "failed:", repr(exc)[:200], flush=True)
                    continue
                row = {"format": fmt, "batch": batch, "context": context, "block_size": block_size, "variant": name,
                       "launch": str(variants.get(name, "")),
                       "ms": ms, "bytes": nbytes, "GBps": nbytes / ms / 1e6, "of_copy": nbytes / ms / 1e6 / (bw / 1e9),
                       "rel_err": err}
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
            del args, want
            torch.cuda.empty_cache()
            Path(a.out).write_text(json.dumps(result, indent=1))
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"\ncopy {bw / 1e9:.0f} GB/s")
    print(f"{'fmt':>6} {'shape':>9} {'old ms':>7} {'def ms':>7} {'best':>16} {'best ms':>7} {'old GB/s':>8} {'def GB/s':>8} {'best GB/s':>9} {'max err':>8}")
    rows = result["rows"]
    for shape in a.shapes:
        batch, context = map(int, shape.split("x"))
        for fmt in a.formats:
            rs = [r for r in rows if r["format"] == fmt and r["batch"] == batch and r["context"] == context]
            if not rs:
                continue
            get = lambda n: next((r for r in rs if r["variant"] == n), None)
            o, d = get("old"), get("default")
            best = min((r for r in rs if r["variant"] != "old"), key=lambda r: r["ms"])
            f = lambda r, k: f"{r[k]:.3f}" if r else "-"
            print(f"{fmt:>6} {shape:>9} {f(o, 'ms'):>7} {f(d, 'ms'):>7} {best['variant']:>16} {best['ms']:7.3f} "
                  f"{(o or {}).get('GBps', 0):8.0f} {(d or {}).get('GBps', 0):8.0f} {best['GBps']:9.0f} "
                  f"{max(r['rel_err'] for r in rs if r['variant'] != 'old'):8.1e}")


if __name__ == "__main__":
    main()
