"""``kvslim serve``: arguments parse into a working app (no port bound); bad input is one clear error line."""
from __future__ import annotations

import argparse

import pytest
from fastapi.testclient import TestClient

from kvslim.cli import main
from kvslim.methods import policy as build_policy
from kvslim.server.cli import add_arguments, build_app


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults() -> None:
    args = _args()
    assert (args.model, args.policy, args.host, args.port, args.kv_memory) == ("smollm2-135m", "full", "127.0.0.1", 8000, None)


def test_arguments_build_a_serving_app() -> None:
    args = _args("--model", "tiny-llama", "--policy", "snapkv", "--keep", "0.5", "--window", "4", "--kv-memory", "0.01",
                 "--block-size", "8", "--device", "cpu", "--port", "8123")
    app = build_app(args)
    engine = app.state.engine.engine
    assert engine.policy.spec.startswith("snapkv(keep=0.5,budget=None,window=4")
    assert engine.blocks.block_size == 8
    with TestClient(app) as client:
        assert client.get("/health").json() == {"status": "ok"}
        reply = client.post("/v1/completions", json={"prompt": list(range(1, 40)), "max_tokens": 5, "ignore_eos": True})
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize(("argv", "message"), [
    (["--policy", "nope"], "unknown method 'nope'"),
    (["--policy", "kivi4", "--keep", "0.25"], "no part takes parameter keep"),
    (["--policy", "tova+int8", "--keep", "0.5"], "one evictor over model-dtype pages"),
    (["--policy", "kivi4", "--block-size", "16"], "give a multiple of 32"),
    (["--kv-memory", "-1"], "positive number of GiB"),
    (["--max-n", "0"], "--max-n 0: give a positive number of completions"),
    (["--model", "gpt-5"], "unknown model 'gpt-5'"),
    (["--dtype", "int8"], "not a floating-point torch dtype"),
    (["--kv-tier", "s3://bucket"], "use memory, disk:PATH or redis://HOST:PORT"),
    (["--kv-tier", "memory", "--policy", "snapkv", "--keep", "0.5"], "never shared"),
    (["--kv-cache-dtype", "fp8_e4m3fn"], "--kv-cache-dtype 'fp8_e4m3fn' is not one of auto, fp8, fp8_e4m3, fp8_e5m2"),
    (["--kv-cache-dtype", "fp8", "--kv-scale", "per-channel"], "--kv-scale 'per-channel' is not one of"),
    (["--policy", "kivi4", "--kv-cache-dtype", "fp8"], "already stores the KV as kivi4"),
    (["--max-num-batched-tokens", "64"], "add --enable-chunked-prefill"),
    (["--enable-chunked-prefill", "--max-num-batched-tokens", "0"], "give a positive number of tokens"),
    (["--enable-chunked-prefill", "--tensor-parallel-size", "2"], "runs in one process"),
])
def test_bad_input_is_one_clear_error_before_loading_a_model(argv: list[str], message: str, capsys) -> None:
    assert main(["serve", "--model", "tiny-llama", "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_kv_cache_dtype_appends_the_fp8_format_to_the_served_policy() -> None:
    from kvslim.server.cli import _policy

    args = _args("--policy", "snapkv", "--keep", "0.5", "--kv-cache-dtype", "fp8_e5m2", "--kv-scale", "per-head")
    assert _policy(args).spec == build_policy("snapkv+fp8_e5m2(scale=per-head)", keep=0.5).spec


def test_kv_tier_counts_show_in_metrics(tmp_path) -> None:
    args = _args("--model", "tiny-llama", "--kv-memory", "0.01", "--block-size", "8", "--device", "cpu",
                 "--kv-tier", f"disk:{tmp_path}")
    app = build_app(args)
    engine = app.state.engine.engine
    prompt = list(range(1, 42))  # 5 full blocks
    with TestClient(app) as client:
        assert client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2}).status_code == 200
        engine.tier.flush()
        metrics = client.get("/metrics").text
    assert "kvslim_tier_writes_total 5\n" in metrics and "kvslim_tier_up 1\n" in metrics
    assert "kvslim_tier_misses_total 5\n" in metrics and "kvslim_tier_bytes_out_total" in metrics
    assert len(list(tmp_path.glob("*.kv"))) == 5
    engine.close()


def test_kv_tier_flag_without_value_means_memory() -> None:
    assert _args("--kv-tier").kv_tier == "memory" and _args().kv_tier is None


def test_chunked_prefill_serves_and_reports_latency_percentiles() -> None:
    args = _args("--model", "tiny-llama", "--kv-memory", "0.01", "--block-size", "8", "--device", "cpu",
                 "--enable-chunked-prefill", "--max-num-batched-tokens", "16")
    app = build_app(args)
    assert app.state.engine.engine.scheduler.token_budget == 16
    with TestClient(app) as client:
        assert "kvslim_itl_p99_seconds NaN\n" in client.get("/metrics").text  # nothing finished yet
        reply = client.post("/v1/completions", json={"prompt": list(range(1, 60)), "max_tokens": 5, "ignore_eos": True})
        assert reply.status_code == 200, reply.text
        metrics = client.get("/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if line.startswith("kvslim_")}
    assert 0 < values["kvslim_ttft_p50_seconds"] <= values["kvslim_ttft_p99_seconds"]
    assert 0 < values["kvslim_itl_p50_seconds"] <= values["kvslim_itl_p99_seconds"]


def test_length_aware_flag_reaches_the_scheduler() -> None:
    common = ("--model", "tiny-llama", "--kv-memory", "0.01", "--device", "cpu")
    assert build_app(_args(*common, "--length-aware")).state.engine.engine.scheduler.admission is not None
    assert build_app(_args(*common)).state.engine.engine.scheduler.admission is None
