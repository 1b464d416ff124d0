"""OpenAI-style HTTP server over the engine: completions, chat completions (SSE streaming too), health, metrics.

``uvicorn --factory "kvslim.server.app:app_from_env"`` or ``create_app(LLMEngine(...))``. A request
that can never fit the KV pool is answered 400 with the reason; a client that disconnects has its
request aborted and its blocks freed.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, Field

from ..engine import LLMEngine, RequestOutput, SamplingParams
from .async_engine import AsyncEngine, Delta


class _Sampling(BaseModel):
    """Sampling fields shared by both OpenAI endpoints."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    stop: str | list[str] | None = None
    stream: bool = False
    ignore_eos: bool = False
    seed: int | None = None
    model: str | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[int]


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


def _params(body: CompletionRequest | ChatRequest) -> SamplingParams:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    try:
        return SamplingParams(body.max_tokens, body.temperature, body.top_p, stop, body.ignore_eos, body.n, body.seed)
    except ValueError as err:
        raise HTTPException(400, str(err)) from None


def _chat_prompt(engine: LLMEngine, messages: list[ChatMessage]) -> str | list[int]:
    """The tokenizer's chat template when it has one, else the messages as "role: content" lines."""
    turns = [{"role": m.role, "content": m.content} for m in messages]
    template = getattr(engine.tokenizer, "chat_template", None)
    if template:
        return list(engine.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True,
                                                         return_dict=False))
    return "".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant:"


def create_app(engine: LLMEngine, model_name: str = "kvslim") -> FastAPI:
    app = FastAPI(title="kvslim engine")
    runner = AsyncEngine(engine)
    app.state.engine = runner

    async def run(request: Request, prompt: str | list[int], params: SamplingParams, chat: bool, stream: bool) -> Any:
        try:
            request_id, queue = runner.submit(prompt, params)
        except ValueError as err:
            raise HTTPException(400, str(err)) from None
        kind = "chat.completion" if chat else "text_completion"
        if stream:
            return StreamingResponse(_sse(request, runner, request_id, queue, kind, model_name), media_type="text/event-stream")
        output = await _wait(request, runner, request_id, queue)
        if output is None:
            return JSONResponse({"error": "client disconnected"}, status_code=499)
        return _body(output, kind, model_name)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await run(request, body.prompt, _params(body), chat=False, stream=body.stream)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Any:
        return await run(request, _chat_prompt(engine, body.messages), _params(body), chat=True, stream=body.stream)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> str:
        m = runner.metrics()
        lines = [
            ("kvslim_requests_waiting", "gauge", "requests waiting for KV blocks", m["waiting"]),
            ("kvslim_requests_running", "gauge", "sequences decoding", m["running"]),
            ("kvslim_kv_blocks_used", "gauge", "KV blocks held", m["blocks_used"]),
            ("kvslim_kv_blocks_free", "gauge", "KV blocks free", m["blocks_free"]),
            ("kvslim_preemptions_total", "counter", "sequences preempted (recomputed later)", m["preemptions"]),
            ("kvslim_generated_tokens_total", "counter", "tokens generated", m["generated_tokens"]),
            ("kvslim_requests_finished_total", "counter", "requests finished", m["finished_requests"]),
        ]
        tier = m["tier"]
        if tier is not None:
            lines += [
                ("kvslim_tier_up", "gauge", "whether the KV tier's store answers (1) or is being retried (0)", int(tier["up"])),
                ("kvslim_tier_hits_total", "counter", "prompt blocks loaded from the KV tier", tier["hits"]),
                ("kvslim_tier_misses_total", "counter", "prompt blocks looked up and not found (recomputed)", tier["misses"]),
                ("kvslim_tier_bytes_in_total", "counter", "bytes loaded from the KV tier", tier["bytes_in"]),
                ("kvslim_tier_bytes_out_total", "counter", "bytes written to the KV tier", tier["bytes_out"]),
                ("kvslim_tier_writes_total", "counter", "blocks written to the KV tier", tier["writes"]),
                ("kvslim_tier_dropped_writes_total", "counter", "block writes dropped (store away or too slow)",
                 tier["dropped_writes"]),
                ("kvslim_tier_corrupt_total", "counter", "tier entries rejected by their checksum or fingerprint",
                 tier["corrupt"]),
                ("kvslim_tier_errors_total", "counter", "failed calls to the tier's store", tier["errors"]),
            ]
        return "".join(f"# HELP {n} {h}\n# TYPE {n} {t}\n{n} {v}\n" for n, t, h, v in lines)

    return app


async def _next(request: Request, queue: asyncio.Queue) -> Any | None:
    """The next item of a request's queue, or None once the client has gone."""
    while True:
        try:
            return await asyncio.wait_for(queue.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                return None


async def _wait(request: Request, runner: AsyncEngine, request_id: str, queue: asyncio.Queue) -> RequestOutput | None:
    while True:
        item = await _next(request, queue)
        if item is None:
            runner.abort(request_id)
            return None
        if isinstance(item, RequestOutput):
            return item


async def _sse(request: Request, runner: AsyncEngine, request_id: str, queue: asyncio.Queue, kind: str,
               model: str) -> AsyncIterator[str]:
    chat = kind == "chat.completion"
    try:
        while True:
            item = await _next(request, queue)
            if item is None:
                return
            if isinstance(item, Delta):
                if item.text:
                    piece = {"index": item.index, "delta": {"content": item.text}} if chat else {"index": item.index, "text": item.text}
                    yield _event(request_id, kind, model, [piece])
                continue
            ends = [({"index": i, "delta": {}} if chat else {"index": i, "text": ""}) | {"finish_reason": c.finish_reason}
                    for i, c in enumerate(item.completions)]
            yield _event(request_id, kind, model, ends, usage=_usage(item))
            yield "data: [DONE]\n\n"
            return
    finally:
        runner.abort(request_id)  # no-op when it finished; frees the blocks when the client went away


def _event(request_id: str, kind: str, model: str, choices: list[dict], usage: dict | None = None) -> str:
    chunk = {"id": request_id, "object": f"{kind}.chunk" if kind == "chat.completion" else kind,
             "created": int(time.time()), "model": model, "choices": choices}
    if usage:
        chunk["usage"] = usage
    return f"data: {json.dumps(chunk)}\n\n"


def _usage(output: RequestOutput) -> dict[str, Any]:
    stats = output.stats
    return {"prompt_tokens": stats["prompt_tokens"], "completion_tokens": stats["completion_tokens"],
            "total_tokens": stats["prompt_tokens"] + stats["completion_tokens"], "kvslim": stats}


def _body(output: RequestOutput, kind: str, model: str) -> dict[str, Any]:
    if kind == "chat.completion":
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason}
                   for i, c in enumerate(output.completions)]
    else:
        choices = [{"index": i, "text": c.text, "finish_reason": c.finish_reason} for i, c in enumerate(output.completions)]
    return {"id": output.request_id, "object": kind, "created": int(time.time()), "model": model,
            "choices": choices, "usage": _usage(output)}


def app_from_env() -> FastAPI:
    """For uvicorn's --factory: KVSLIM_MODEL (anything ``--model`` takes), KVSLIM_POLICY, KVSLIM_KV_MEMORY (GiB), KVSLIM_DEVICE."""
    from ..engine import LLM

    name = os.environ.get("KVSLIM_MODEL", "smollm2-135m")
    memory = os.environ.get("KVSLIM_KV_MEMORY")
    llm = LLM(name, policy=os.environ.get("KVSLIM_POLICY", "full"), kv_memory=float(memory) if memory else None,
              device=os.environ.get("KVSLIM_DEVICE", "cpu"))
    return create_app(llm, name)
