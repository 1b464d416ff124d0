"""The server over real HTTP never stops serving: every bad request is a clear 4xx, an engine failure a 500 for
its own request only, a long prefill holds up no other answer, a client that goes away frees its blocks."""
from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import httpx
import openai
import pytest

from kvslim.engine import LLMEngine
from kvslim.models import tiny_model
from kvslim.server.app import create_app
from serving import ByteTokenizer, serve

NORMAL = {"prompt": "hello world", "max_tokens": 8, "ignore_eos": True}
MAX_LEN = 4096  # the tiny models' context


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", "gqa", seed=0)


def _app(model: Any, **engine_args: Any) -> Any:
    engine = LLMEngine(model, ByteTokenizer(), kv_memory=0.01, block_size=4, **{"max_num_seqs": 8, **engine_args})
    return create_app(engine, "tiny")


@pytest.fixture(scope="module")
def server(model) -> Iterator[tuple[str, Any]]:
    app = _app(model)
    with serve(app) as url:
        yield url, app


def _text(url: str, body: dict = NORMAL) -> str:
    reply = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["text"]


def _metrics(url: str) -> dict[str, float]:
    lines = httpx.get(f"{url}/metrics", timeout=10).text.splitlines()
    return {name: float(value) for name, value in (line.split() for line in lines if not line.startswith("#"))}


def _assert_error(reply: httpx.Response, status: int, fragment: str) -> dict:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and fragment in error["message"], error
    return error


TRIGGERS = [  # (request body, status, what the message says)
    ({"prompt": [-1, 5]}, 400, "prompt token -1 (position 0) is not in the model's vocabulary: token ids are 0..255"),
    ({"prompt": [10**9]}, 400, "prompt token 1000000000"),
    ('{"prompt": "hi", "temperature": NaN}', 400, "temperature=nan must be a finite number"),
    ({"prompt": "hi", "temperature": 1e-40}, 400, "use 0 for greedy or at least 0.01"),
    ({"prompt": "hi", "top_p": 0}, 400, "top_p=0.0 must be in (0, 1]"),
    ({"prompt": "hi", "top_k": -1}, 400, "top_k=-1 must be >= 0"),
    ({"prompt": "hi", "seed": 2**70}, 400, "does not fit in 64 bits"),
    ({"prompt": "hi", "n": 129}, 400, "n=129 is more completions than this server gives for one request (128)"),
    ({"prompt": "hi", "n": 9}, 400, "n=9 completions are decoded at once, but the engine decodes at most 8"),
    ({"prompt": "hi", "model": "gpt-4o"}, 404, "the model 'gpt-4o' does not exist here: this server serves 'tiny'"),
    ({"prompt": "hi", "max_tokens": 10**6}, 400, "exceeds the model's maximum context of 4096 tokens"),
    ({"prompt": "x" * (32 * MAX_LEN + 1)}, 400, "prompt of 131073 characters cannot fit the model's context"),
    ({"prompt": "x" * (8 * 32 * MAX_LEN)}, 413, "is over this server's limit of 1048576 bytes"),
    ({"prompt": [7] * (MAX_LEN + 1)}, 400, "exceeds the model's maximum context"),
    ("{", 400, "JSON decode error"),
    ({"max_tokens": 3}, 400, "prompt: Field required"),
    ({"prompt": "hi", "stop": 5}, 400, "stop"),
]


@pytest.mark.parametrize(("body", "status", "fragment"), TRIGGERS, ids=[f"{i}-{t[1]}" for i, t in enumerate(TRIGGERS)])
def test_each_trigger_is_a_clear_error_and_the_next_request_is_unaffected(server, body, status, fragment) -> None:
    url, _ = server
    before = _text(url)
    content = body if isinstance(body, str) else json.dumps(body)
    headers = {"content-type": "application/json"}
    reply = httpx.post(f"{url}/v1/completions", content=content, headers=headers, timeout=60)
    _assert_error(reply, status, fragment)
    assert _text(url) == before
    assert httpx.get(f"{url}/health", timeout=10).json() == {"status": "ok"}


def test_errors_outside_the_endpoints_are_openai_bodies_too(server) -> None:
    url, _ = server
    missing = _assert_error(httpx.get(f"{url}/v1/nothing", timeout=10), 404, "Not Found")
    assert missing["type"] == "invalid_request_error"
    error = _assert_error(httpx.post(f"{url}/v1/chat/completions", json={"messages": []}, timeout=10), 400, "messages")
    assert error["param"] == "messages"
    chat = {"messages": [{"role": "user", "content": "hi"}], "model": "x"}
    _assert_error(httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=10), 404, "'x' does not exist")


def test_empty_stop_strings_are_ignored(server) -> None:
    url, _ = server
    assert _text(url, {**NORMAL, "stop": [""]}) == _text(url, {**NORMAL, "stop": ["", "\x01\x02\x03"]}) == _text(url)


def test_a_failing_step_is_a_500_for_its_request_only(server, monkeypatch) -> None:
    """The prefill of one marked prompt raises, then one decode step: each time that request gets a 500 with an
    OpenAI body (streaming too, before its 200), and the engine serves the next request as before."""
    url, app = server
    runner = app.state.engine.engine.runner
    before = _text(url)
    prefill, decode = runner.prefill, runner.decode

    def failing_prefill(seq, compress, *chunk):
        if bytes(seq.prompt_token_ids[:4]) == b"FAIL":
            raise RuntimeError("prefill blew up")
        return prefill(seq, compress, *chunk)

    monkeypatch.setattr(runner, "prefill", failing_prefill)
    for stream in (False, True):
        body = {**NORMAL, "prompt": "FAIL here", "stream": stream}
        reply = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        error = _assert_error(reply, 500, "RuntimeError: prefill blew up")
        assert (error["type"], error["code"]) == ("server_error", "engine_step_failed")
        assert _text(url) == before

    failed = threading.Event()

    def failing_decode(batch):
        if not failed.is_set():
            failed.set()
            raise RuntimeError("decode blew up")
        return decode(batch)

    monkeypatch.setattr(runner, "decode", failing_decode)
    _assert_error(httpx.post(f"{url}/v1/completions", json=NORMAL, timeout=60), 500, "decode blew up")
    assert _text(url) == before
    metrics = _metrics(url)
    assert metrics["kvslim_requests_failed_total"] == 3 and metrics["kvslim_kv_blocks_used"] == 0


def test_health_answers_while_a_prefill_is_blocked(model, monkeypatch) -> None:
    """No timing: the prefill waits on an event the test sets only after /health, /metrics and another
    submission were answered or accepted; a server that waited on the engine would time out here."""
    app = _app(model)
    runner = app.state.engine.engine.runner
    entered, release = threading.Event(), threading.Event()
    prefill = runner.prefill

    def blocked(seq, compress, *chunk):
        entered.set()
        assert release.wait(60)
        return prefill(seq, compress, *chunk)

    monkeypatch.setattr(runner, "prefill", blocked)
    with serve(app) as url, ThreadPoolExecutor(2) as pool, httpx.Client(base_url=url, timeout=5) as client:
        first = pool.submit(_text, url)
        assert entered.wait(60)
        second = pool.submit(_text, url, {**NORMAL, "prompt": "another prompt"})  # queued behind the blocked step
        for _ in range(5):
            started = time.perf_counter()
            assert client.get("/health").json() == {"status": "ok"}
            health = time.perf_counter() - started
            assert "kvslim_requests_running" in client.get("/metrics").text
            print(f"during a blocked prefill: /health {1000 * health:.1f} ms, /metrics "
                  f"{1000 * (time.perf_counter() - started - health):.1f} ms")
        assert not first.done() and not second.done()
        release.set()
        assert first.result(60) and second.result(60)


def test_a_dead_engine_loop_makes_health_503(model, monkeypatch) -> None:
    app = _app(model)
    monkeypatch.setattr(app.state.engine.engine.scheduler, "schedule", lambda: 1 / 0)
    with serve(app) as url:
        _assert_error(httpx.post(f"{url}/v1/completions", json=NORMAL, timeout=60), 503, "ZeroDivisionError")
        error = _assert_error(httpx.get(f"{url}/health", timeout=10), 503, "the engine loop stopped: ZeroDivisionError")
        assert error["code"] == "engine_stopped"
        _assert_error(httpx.post(f"{url}/v1/completions", json=NORMAL, timeout=60), 503, "restart the server")
        assert "kvslim_up 0" in httpx.get(f"{url}/metrics", timeout=10).text


def test_n_that_the_residual_ring_cannot_hold_is_refused_at_once(model) -> None:
    engine = LLMEngine(model, ByteTokenizer(), policy="kivi4", kv_memory=0.002, max_num_seqs=256)
    rows = engine.blocks.rows
    assert 1 < rows < 256
    with serve(create_app(engine, "tiny")) as url:
        reply = httpx.post(f"{url}/v1/completions", json={**NORMAL, "n": rows + 1}, timeout=60)
        _assert_error(reply, 400, f"n={rows + 1} completions are decoded at once (one row of the residual ring each; "
                                  f"the ring has {rows})")
        assert len(httpx.post(f"{url}/v1/completions", json={**NORMAL, "n": 2}, timeout=60).json()["choices"]) == 2


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_goes_away_frees_its_blocks(model, monkeypatch, stream: bool) -> None:
    """A request that would decode for a long while (each step slowed): the client closes its socket once
    the request runs; the server notices, aborts it and frees every block, in well under two seconds."""
    app = _app(model)
    runner = app.state.engine.engine.runner
    decode = runner.decode

    def slow(batch):
        time.sleep(0.01)
        return decode(batch)

    monkeypatch.setattr(runner, "decode", slow)
    body = json.dumps({"prompt": "a long story", "max_tokens": 3000, "ignore_eos": True, "stream": stream}).encode()
    with serve(app) as url:
        port = int(url.rsplit(":", 1)[1])
        client = socket.create_connection(("127.0.0.1", port))
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                       b"content-length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 60
        while _metrics(url)["kvslim_requests_running"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        client.close()
        gone = time.monotonic()
        while (m := _metrics(url))["kvslim_kv_blocks_used"] > 0 or m["kvslim_requests_running"] > 0:
            assert time.monotonic() - gone < 2, m
            time.sleep(0.02)
        print(f"blocks freed {time.monotonic() - gone:.2f} s after the client left (stream={stream})")
        assert m["kvslim_requests_aborted_total"] == 1 and m["kvslim_generated_tokens_total"] < 3000
        assert _text(url)


def test_models_with_the_openai_client(server) -> None:
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").owned_by == "kvslim"
    reply = client.completions.create(model="tiny", prompt="hello world", max_tokens=8, extra_body={"ignore_eos": True})
    assert reply.choices[0].text == _text(url)
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="gpt-4o", prompt="hi", max_tokens=2)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="hi", temperature=1e-40)
