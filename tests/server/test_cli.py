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
    (["--model", "gpt-5"], "unknown model 'gpt-5'"),
    (["--dtype", "int8"], "not a floating-point torch dtype"),
])
def test_bad_input_is_one_clear_error_before_loading_a_model(argv: list[str], message: str, capsys) -> None:
    assert main(["serve", "--model", "tiny-llama", "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
