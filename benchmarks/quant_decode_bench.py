"""GPU benchmark: Triton decode attention over packed KV codes vs SDPA over a bf16 cache of the same context.

Llama-3.1-8B decode shape (32 query heads, 8 KV heads, head_dim 128), one new query per sequence. For each
format and context the kernel is first checked against the PyTorch reference (dequantize, then attend),
then both it and ``torch.nn.functional.scaled_dot_product_attention`` over the dequantized bf16 cache are
timed with ``triton.testing.do_bench`` (median, L2 flushed between calls). Achieved bandwidth counts the
bytes each must read (codes, scales, split partials; or bf16 keys and values) against the device's copy
bandwidth (a large device-to-device copy, bytes read plus written), the practical roofline.

    python benchmarks/quant_decode_bench.py --out results.json     # on a CUDA machine
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import warnings
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

import torch
import torch.nn.functional as F
import triton
from timing import copy_bandwidth
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from kvslim.cache.quantized import ChannelGroups, QuantizedSegment, TokenGroups
from kvslim.kernels.quant_decode import plan_decode, quant_decode
from kvslim.kernels.quant_decode_ref import quant_decode_ref

FORMATS = {
    "kivi2": (partial(ChannelGroups.encode, bits=2, group=32), partial(TokenGroups.encode, bits=2, group=32)),
    "kivi4": (partial(ChannelGroups.encode, bits=4, group=32), partial(TokenGroups.encode, bits=4, group=32)),
    "int4": (partial(TokenGroups.encode, bits=4, group=32), partial(TokenGroups.encode, bits=4, group=32)),
    "int8": (partial(TokenGroups.encode, bits=8, group=128), partial(TokenGroups.encode, bits=8, group=128)),
}


def fastest_sdpa(sdpa: partial) -> tuple[str, float]:
    """The fastest SDPA backend that takes this call (GQA, one query) and its median time in ms."""
    best = ("none", float("inf"))
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH):
        try:
            with sdpa_kernel(backend), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # each refusing backend explains why
                sdpa()
                ms = do_bench(sdpa, return_mode="median")
        except RuntimeError:  # this backend does not support the call
            continue
        best = min(best, (backend.name.lower(), ms), key=lambda b: b[1])
    return best


def sweep(query: torch.Tensor, seg: QuantizedSegment, scaling: float, q_heads: int,
          ref: torch.Tensor) -> dict[str, dict[str, float]]:
    """Kernel time (ms) and error for each tile length and warp count: what the defaults were chosen from."""
    results = {}
    for block_t in (64, 128):
        plan = plan_decode(seg, q_heads, block_t=block_t)
        for warps in (4, 8):
            out = quant_decode(query, seg, scaling, plan, num_warps=warps)
            ms = do_bench(lambda: quant_decode(query, seg, scaling, plan, num_warps=warps), return_mode="median")
            err = float((out.float() - ref.float()).norm() / ref.float().norm())
            results[f"block_t={plan.block_t},num_warps={warps}"] = {"kernel_ms": ms, "rel_err": err}
    return results


def cache(batch: int, kv_heads: int, tokens: int, dim: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random bf16 keys (with a few large channels, as real keys have) and values."""
    keys = torch.randn(batch, kv_heads, tokens, dim, device="cuda", generator=gen)
    keys[..., :4] = keys[..., :4] * 4 + 8
    values = torch.randn(batch, kv_heads, tokens, dim, device="cuda", generator=gen)
    return keys.bfloat16(), values.bfloat16()


def run(args: argparse.Namespace) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    scaling = args.head_dim**-0.5
    roofline = copy_bandwidth()
    rows = []
    for tokens in args.contexts:
        keys, values = cache(args.batch, args.kv_heads, tokens, args.head_dim, gen)
        query = torch.randn(args.batch, args.q_heads, args.head_dim, device="cuda", generator=gen).bfloat16()
        keep = torch.ones(keys.shape[:3], dtype=torch.bool, device="cuda")
        for name in args.formats:
            seg = QuantizedSegment.from_padded(keys, values, keep, *FORMATS[name])
            plan = plan_decode(seg, args.q_heads, block_t=args.block_t)
            out = quant_decode(query, seg, scaling, plan, num_warps=args.num_warps)
            ref = quant_decode_ref(query, seg, scaling)
            rel = float((out.float() - ref.float()).norm() / ref.float().norm())
            dense_k, dense_v, _ = seg.dense()  # the same (dequantized) context as a bf16 cache, for SDPA
            sdpa = partial(F.scaled_dot_product_attention, query.unsqueeze(2), dense_k, dense_v, scale=scaling,
                           enable_gqa=True)
            rel_sdpa = float((sdpa().squeeze(2).float() - ref.float()).norm() / ref.float().norm())
            kernel_ms = do_bench(lambda: quant_decode(query, seg, scaling, plan, num_warps=args.num_warps),
                                 return_mode="median")
            backend, sdpa_ms = fastest_sdpa(sdpa)
            io = 2 * query.numel() * query.element_size()
            kernel_bytes = seg.nbytes() + io + 2 * sum(t.numel() * t.element_size() for t in plan.partials)
            sdpa_bytes = 2 * dense_k.numel() * dense_k.element_size() + io
            row = {
                "format": name, "context": tokens, "rel_err_vs_reference": rel, "sdpa_rel_err_vs_reference": rel_sdpa,
                "kernel_ms": kernel_ms, "sdpa_bf16_ms": sdpa_ms, "speedup_vs_sdpa": sdpa_ms / kernel_ms,
                "kernel_bytes": kernel_bytes, "sdpa_bytes": sdpa_bytes, "bytes_ratio": kernel_bytes / sdpa_bytes,
                "kernel_bytes_per_s": kernel_bytes / (kernel_ms * 1e-3), "sdpa_bytes_per_s": sdpa_bytes / (sdpa_ms * 1e-3),
                "splits": plan.splits, "sdpa_backend": backend,
            }
            row["kernel_fraction_of_copy_bw"] = row["kernel_bytes_per_s"] / roofline
            row["sdpa_fraction_of_copy_bw"] = row["sdpa_bytes_per_s"] / roofline
            rows.append(row)
            print(f"{name:6s} {tokens:6d}  err {rel:.1e}  kernel {kernel_ms * 1e3:7.1f} us "
                  f"({row['kernel_bytes_per_s'] / 1e12:.2f} TB/s, {row['kernel_fraction_of_copy_bw']:.0%})  "
                  f"sdpa {sdpa_ms * 1e3:7.1f} us ({row['sdpa_bytes_per_s'] / 1e12:.2f} TB/s)  x{row['speedup_vs_sdpa']:.2f}",
                  flush=True)
            if args.sweep and tokens == args.contexts[-1]:
                row["sweep"] = sweep(query, seg, scaling, args.q_heads, ref)
                print("  sweep:", {k: round(v["kernel_ms"] * 1e3, 1) for k, v in row["sweep"].items()}, flush=True)
            if rel > 1e-2:
                raise SystemExit(f"{name} at {tokens} tokens: relative error {rel:.3g} vs the reference exceeds 1e-2")
            del seg, plan, dense_k, dense_v
        del keys, values
        torch.cuda.empty_cache()
    return {
        "benchmark": "quant_decode", "date": datetime.date.today().isoformat(), "commit": args.commit or _commit(),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "shape": {"batch": args.batch, "q_heads": args.q_heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                  "dtype": "bfloat16"},
        "block_t": args.block_t, "num_warps": args.num_warps,
        "timing": "triton.testing.do_bench median, L2 flushed; kernel time includes the split-merge launch; "
                  "SDPA: fastest backend",
        "copy_bandwidth_bytes_per_s": roofline, "results": rows,
    }


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-t", type=int, default=64, help="tokens per tile (KIVI keys: at most a run)")
    parser.add_argument("--num-warps", type=int, default=4)
    parser.add_argument("--sweep", action="store_true", help="also time other tiles and warp counts at the last context")
    parser.add_argument("--commit", help="git commit to record (default: git rev-parse HEAD, if a checkout)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "quant_decode.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("quant_decode_bench needs a CUDA GPU")
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
