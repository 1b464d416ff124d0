"""``kvslim serve``: the OpenAI-compatible server over the paged engine, from the command line.

Arguments are checked before a model is loaded (a bad policy or size fails in a second, not after a
download); every user error is a ``ValueError`` with one clear line, which ``kvslim`` prints without a
traceback. :func:`build_app` makes the app without binding a port, so tests run it in process.
"""
from __future__ import annotations

import argparse
from typing import Any

from fastapi import FastAPI

from ..cli import add_kv_cache_dtype_args
from ..methods import Method, policy as build_policy
from ..methods.fp8_static import kv_cache_dtype_spec
from ..models.help import MODEL_HELP

POLICY_PARAMS = ("keep", "budget", "window", "sinks")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help=MODEL_HELP)
    parser.add_argument("--policy", default="full", help="method spec, e.g. snapkv, streaming(sinks=4), kivi4, snapkv+kivi4")
    parser.add_argument("--keep", type=float, help="fraction of prompt tokens kept, in (0, 1]")
    parser.add_argument("--budget", type=int, help="tokens kept per KV head (instead of --keep)")
    parser.add_argument("--window", type=int, help="observation / recent window in tokens")
    parser.add_argument("--sinks", type=int, help="attention-sink tokens always kept")
    add_kv_cache_dtype_args(parser)
    parser.add_argument("--kv-memory", type=float,
                        help="GiB for the KV pool (default: on a GPU 90%% of its free memory; on CPU 4 GiB, or a "
                             "quarter of the free RAM if that is less)")
    parser.add_argument("--block-size", type=int, help="token slots per KV block (default 16; kivi: its key run, 32)")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="sequences decoded at once, at most")
    parser.add_argument("--enable-chunked-prefill", action="store_true",
                        help="run prompt chunks beside decode steps, so a long prompt does not stall decoding")
    parser.add_argument("--max-num-batched-tokens", type=int,
                        help="tokens per step with --enable-chunked-prefill: decode tokens, then prompt chunks (default 2048)")
    parser.add_argument("--max-n", type=int, default=128, help="most completions (n) one request may ask for")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--dtype", help="model dtype: float32, bfloat16 or float16 "
                                         "(default: bfloat16 on a GPU, float32 on the CPU; random-weight presets: bfloat16)")
    parser.add_argument("--enforce-eager", action="store_true", help="decode without CUDA graphs (GPU only)")
    parser.add_argument("--length-aware", action="store_true",
                        help="admit a request only when KV memory also holds the output every running request is "
                             "expected to write (from max_tokens and past output lengths): fewer preemptions")
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="processes the model's heads and MLP are split over (one per GPU: cuda:0..N-1; gloo on cpu)")
    parser.add_argument("--kv-tier", nargs="?", const="memory",
                        help="KV block tier below the pool, shared with other engines: memory (the default when the "
                             "flag has no value), disk:PATH or redis://HOST:PORT")


def _policy(args: argparse.Namespace) -> Method:
    params = {k: getattr(args, k) for k in POLICY_PARAMS if getattr(args, k, None) is not None}
    return build_policy(kv_cache_dtype_spec(args.policy, args.kv_cache_dtype, args.kv_scale), **params)


def _dtype(name: str | None) -> Any:
    import torch

    if name is None:
        return None
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"--dtype {name!r} is not a floating-point torch dtype: use float32, bfloat16 or float16")
    return dtype


def _device(name: str | None) -> Any:
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r} is not a device ({err}): use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is visible here; use --device cpu")
    return device


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked without loading a model's weights; raises ValueError."""
    from ..cache.tier import parse_spec
    from ..engine.compression import Compression
    from ..engine.sharding import check_divisible
    from ..engine.tier_link import check_policy
    from ..models import load_config

    config = load_config(args.model)  # any --model kind; names the accepted ones when it is none
    compression = Compression(_policy(args), config.num_hidden_layers, scaling=1.0)  # refuses what the engine cannot run
    if args.kv_memory is not None and args.kv_memory <= 0:
        raise ValueError(f"--kv-memory {args.kv_memory}: give a positive number of GiB, e.g. --kv-memory 4")
    if args.block_size is not None and args.block_size < 1:
        raise ValueError(f"--block-size {args.block_size}: give a positive number of tokens, e.g. 16")
    quantizer = compression.quantizer
    if quantizer is not None and args.block_size is not None and args.block_size % quantizer.block():
        unit = quantizer.block()
        raise ValueError(f"--block-size {args.block_size}: {quantizer.name} packs keys in runs of {unit} tokens; "
                         f"give a multiple of {unit}")
    if args.max_n < 1:
        raise ValueError(f"--max-n {args.max_n}: give a positive number of completions")
    if args.max_num_seqs < 1:
        raise ValueError(f"--max-num-seqs {args.max_num_seqs}: give a positive number of sequences")
    if args.max_num_batched_tokens is not None and not args.enable_chunked_prefill:
        raise ValueError(f"--max-num-batched-tokens {args.max_num_batched_tokens} is the token budget of a chunked-prefill "
                         "step: add --enable-chunked-prefill")
    if args.max_num_batched_tokens is not None and args.max_num_batched_tokens < 1:
        raise ValueError(f"--max-num-batched-tokens {args.max_num_batched_tokens}: give a positive number of tokens, "
                         "e.g. 2048")
    if args.enable_chunked_prefill and args.tensor_parallel_size > 1:
        raise ValueError("--enable-chunked-prefill runs in one process: leave it out with --tensor-parallel-size > 1")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port {args.port}: give a TCP port in 0..65535")
    _dtype(args.dtype)
    _device(args.device)
    check_divisible(config, args.tensor_parallel_size)
    if args.kv_tier is not None and args.tensor_parallel_size > 1:
        raise ValueError("--kv-tier stores whole blocks of one process: leave it out with --tensor-parallel-size > 1")
    if args.kv_tier is not None:
        parse_spec(args.kv_tier)
        check_policy(compression)


def build_app(args: argparse.Namespace) -> FastAPI:
    """Load the model, build the engine and the app (nothing is bound yet)."""
    from ..engine import LLM
    from .app import create_app

    check_args(args)
    llm = LLM(args.model, policy=_policy(args), kv_memory=args.kv_memory, block_size=args.block_size,
              dtype=_dtype(args.dtype), device=_device(args.device), max_num_seqs=args.max_num_seqs,
              kv_tier=args.kv_tier, enforce_eager=args.enforce_eager, tensor_parallel_size=args.tensor_parallel_size,
              chunked_prefill=args.enable_chunked_prefill, max_num_batched_tokens=args.max_num_batched_tokens,
              length_aware=args.length_aware)
    return create_app(llm, args.model, max_n=args.max_n)


def main_from_args(args: argparse.Namespace) -> int:
    import uvicorn

    app = build_app(args)
    engine = app.state.engine.engine
    tier = f", KV tier {engine.tier.name}" if engine.tier is not None else ""
    print(f"kvslim serve: {args.model} on {engine.runner.device}, policy {engine.policy.spec}, "
          f"{engine.blocks.num_blocks} KV blocks of {engine.blocks.block_size} tokens"
          f"{' of one layer and KV head' if engine.head_blocks else ''}{tier}; "
          f"http://{args.host}:{args.port}/v1", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        engine.close()
    return 0
