"""``kvslim serve --tensor-parallel-size``: the server talks to rank 0; sizes that cannot work fail before loading."""
from __future__ import annotations

import argparse

import pytest
from fastapi.testclient import TestClient

from kvslim.cli import main
from kvslim.server.cli import add_arguments, build_app


@pytest.mark.parametrize(("argv", "message"), [
    (["--tensor-parallel-size", "3"], "must divide the model's 2 KV heads"),
    (["--tensor-parallel-size", "0"], "positive number of processes"),
    (["--tensor-parallel-size", "2", "--kv-tier", "memory"], "leave it out with --tensor-parallel-size > 1"),
])
def test_bad_sizes_are_one_clear_error(argv: list[str], message: str, capsys) -> None:
    assert main(["serve", "--model", "tiny-llama", "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_two_ranks_serve_a_completion() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", "tiny-llama", "--kv-memory", "0.01", "--device", "cpu", "--tensor-parallel-size", "2"])
    app = build_app(args)
    engine = app.state.engine.engine
    try:
        with TestClient(app) as client:
            reply = client.post("/v1/completions", json={"prompt": list(range(1, 40)), "max_tokens": 5, "ignore_eos": True})
            assert reply.status_code == 200, reply.text
            assert reply.json()["usage"]["completion_tokens"] == 5
    finally:
        engine.close()
    assert not any(p.is_alive() for p in engine.runner.workers.processes)
