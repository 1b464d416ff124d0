"""The HTTP server: concurrent requests complete with the right text, streaming, errors, metrics, disconnects."""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from kvslim.engine import LLM, LLMEngine, SamplingParams
from kvslim.models import tiny_model
from kvslim.server.app import create_app
from serving import ByteTokenizer


PROMPTS = ["hello world", "the quick brown fox", "kv", "paged attention is"]
MANY = [f"{PROMPTS[i % 4]} #{i}" for i in range(64)]  # 64 concurrent clients, different prompts


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", "gqa", seed=0)


@pytest.fixture
def client(model):
    engine = LLMEngine(model, ByteTokenizer(), kv_memory=0.01, block_size=4)
    with TestClient(create_app(engine)) as client:
        yield client


def _expected(model, prompts: list[str], max_tokens: int) -> list[str]:
    llm = LLM(model, tokenizer=ByteTokenizer(), kv_memory=0.01, block_size=4)
    return [o.text for o in llm.generate(prompts, SamplingParams(max_tokens=max_tokens))]


def test_concurrent_completions_all_finish_with_the_right_text(client, model) -> None:
    def ask(prompt: str) -> str:
        reply = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 12})
        assert reply.status_code == 200, reply.text
        return reply.json()["choices"][0]["text"]

    with ThreadPoolExecutor(len(MANY)) as pool:
        texts = list(pool.map(ask, MANY))
    assert texts == _expected(model, MANY, 12)


def test_streamed_chat_concatenates_to_the_full_text(client, model) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "stream": True}
    pieces, finish = [], None
    with client.stream("POST", "/v1/chat/completions", json=body) as reply:
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            pieces.append(choice["delta"].get("content", ""))
            finish = choice.get("finish_reason") or finish
    assert "".join(pieces) == _expected(model, ["user: hi\nassistant:"], 10)[0]
    assert finish in ("length", "stop")


def test_oversize_request_is_a_clear_400(client) -> None:
    reply = client.post("/v1/completions", json={"prompt": "x" * 200, "max_tokens": 10**6})
    assert reply.status_code == 400
    assert "exceeds the model's maximum context" in reply.json()["error"]["message"]


def test_request_larger_than_the_pool_is_a_clear_400(model) -> None:
    block_bytes = LLMEngine(model, ByteTokenizer(), kv_memory=0.001, block_size=4).block_bytes
    engine = LLMEngine(model, ByteTokenizer(), kv_memory=8 * block_bytes / 2**30, block_size=4)  # 32 slots
    with TestClient(create_app(engine)) as small:
        reply = small.post("/v1/completions", json={"prompt": "x" * 30, "max_tokens": 10})
        assert reply.status_code == 400 and "whole pool has 8" in reply.json()["error"]["message"]
        assert small.post("/v1/completions", json={"prompt": "x" * 20, "max_tokens": 10}).status_code == 200


def test_health_and_metrics(client) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 3})
    text = client.get("/metrics").text
    assert "kvslim_kv_blocks_free" in text and "kvslim_requests_finished_total 1" in text


def test_disconnected_stream_frees_its_blocks(client) -> None:
    engine: LLMEngine = client.app.state.engine.engine
    body = {"prompt": "a long story", "max_tokens": 500, "stream": True, "ignore_eos": True}
    with client.stream("POST", "/v1/completions", json=body) as reply:
        next(reply.iter_lines())  # the first token arrived; then the client goes away
    deadline = time.time() + 10
    while (engine.blocks.num_free < engine.blocks.num_blocks or engine.has_unfinished) and time.time() < deadline:
        time.sleep(0.05)
    assert engine.blocks.num_free == engine.blocks.num_blocks and not engine.has_unfinished


def test_a_list_of_prompts_gives_n_choices_per_prompt_in_order(client, model) -> None:
    reply = client.post("/v1/completions", json={"prompt": PROMPTS[:3], "max_tokens": 6, "n": 2})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert [c["index"] for c in body["choices"]] == list(range(6))
    expected = _expected(model, PROMPTS[:3], 6)  # greedy: both choices of a prompt are its one answer
    assert [c["text"] for c in body["choices"]] == [t for t in expected for _ in range(2)]
    assert body["usage"]["completion_tokens"] == 6 * 6 and len(body["usage"]["kvslim"]) == 3


def test_a_list_of_prompts_cannot_stream_and_must_not_be_empty(client) -> None:
    reply = client.post("/v1/completions", json={"prompt": ["a", "b"], "stream": True})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "stream"
    reply = client.post("/v1/completions", json={"prompt": []})
    assert reply.status_code == 400 and "empty list" in reply.json()["error"]["message"]


def test_chat_content_as_text_parts_equals_plain_content(client) -> None:
    def ask(content) -> str:
        reply = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}],
                                                          "max_tokens": 6})
        assert reply.status_code == 200, reply.text
        return reply.json()["choices"][0]["message"]["content"]

    assert ask([{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}]) == ask("hello world")
    reply = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]})
    assert reply.status_code == 400 and reply.json()["error"]["type"] == "invalid_request_error"
