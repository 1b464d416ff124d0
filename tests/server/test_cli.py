"""``kvslim serve``: arguments parse into a working app (no port bound); bad input is one clear error line."""
from __future__ import annotations

import argparse

import pytest
from fastapi.testclient import TestClient

from kvslim.cli import main
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
    (["--policy", "h2o", "--keep", "0.5"], "evicts on every decoding step"),
    (["--policy", "kivi4", "--block-size", "16"], "give a multiple of 32"),
    (["--kv-memory", "-1"], "positive number of GiB"),
    (["--max-n", "0"], "--max-n 0: give a positive number of completions"),
    (["--model", "gpt-5"], "unknown model 'gpt-5'"),
    (["--dtype", "int8"], "not a floating-point torch dtype"),
    (["--kv-tier", "s3://bucket"], "use memory, disk:PATH or redis://HOST:PORT"),
    (["--kv-tier", "memory", "--policy", "snapkv", "--keep", "0.5"], "never shared"),
])
def test_bad_input_is_one_clear_error_before_loading_a_model(argv: list[str], message: str, capsys) -> None:
    assert main(["serve", "--model", "tiny-llama", "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


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


def test_length_aware_flag_reaches_the_scheduler() -> None:
    common = ("--model", "tiny-llama", "--kv-memory", "0.01", "--device", "cpu")
    assert build_app(_args(*common, "--length-aware")).state.engine.engine.scheduler.admission is not None
    assert build_app(_args(*common)).state.engine.engine.scheduler.admission is None
