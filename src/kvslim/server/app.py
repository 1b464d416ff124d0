"""OpenAI-style HTTP server over the engine: completions, chat completions (SSE streaming too), models,
health, metrics.

``uvicorn --factory "kvslim.server.app:app_from_env"`` or ``create_app(LLMEngine(...))``. No request
can stop the server: what the engine would choke on is refused with a 4xx before it gets there (see
:mod:`.limits` and :meth:`LLMEngine.encode`/:meth:`LLMEngine.check`: a request that can never fit is
refused at once, with the numbers), tokenizing runs in a worker thread and the engine on its own
(:mod:`.async_engine`), so the event loop always answers, and a client that goes away, streaming or not,
has its request aborted and its blocks freed within :data:`DISCONNECT_POLL_S`.
"""
from __future__ import annotations

import asyncio
import os
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse, StreamingResponse

from ..engine import LLMEngine, RequestOutput, SamplingParams
from .async_engine import AsyncEngine, Delta
from .errors import APIError, install_handlers
from .limits import BODY_BYTES_PER_CHAR, CHARS_PER_TOKEN, BodyLimit, check_prompt_chars
from .protocol import (ChatMessage, ChatRequest, CompletionRequest, batch_completion_body, completion_body,
                       error_event, final_events, model_card, text_event)

#: How often a waiting request checks that its client is still there (seconds).
DISCONNECT_POLL_S = 0.25
#: Default cap on ``n`` (OpenAI's own).
MAX_N = 128


def _chat_prompt(engine: LLMEngine, messages: list[ChatMessage]) -> str | list[int]:
    """The tokenizer's chat template when it has one, else the messages as "role: content" lines."""
    turns = [{"role": m.role, "content": m.text()} for m in messages]
    template = getattr(engine.tokenizer, "chat_template", None)
    if template:
        return list(engine.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True,
                                                         return_dict=False))
    return "".join(f"{m.role}: {m.text()}\n" for m in messages) + "assistant:"


class _Watch:
    """A submitted request's results, watched: a client that goes away aborts it (its blocks are freed) and
    ends the wait, whether or not results are arriving. :meth:`close` when done (a no-op abort if it finished)."""

    def __init__(self, request: Request, runner: AsyncEngine, request_id: str, queue: asyncio.Queue):
        self.request, self.runner, self.request_id, self.queue = request, runner, request_id, queue
        self.watcher = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while not await self.request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        self.runner.abort(self.request_id)
        self.queue.put_nowait(None)

    async def next(self) -> "Delta | RequestOutput | APIError | None":
        """The next result; None once the client has gone."""
        return await self.queue.get()

    def close(self) -> None:
        self.watcher.cancel()
        self.runner.abort(self.request_id)


def create_app(engine: LLMEngine, model_name: str = "kvslim", max_n: int = MAX_N,
               max_body_bytes: int | None = None) -> FastAPI:
    """The app over ``engine``, served as ``model_name``; ``n`` is capped at ``max_n``; request bodies at
    ``max_body_bytes`` (default: what a prompt filling the model's context could take as JSON)."""
    runner = AsyncEngine(engine)
    max_len = engine.runner.max_model_len
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        runner.stop()

    app = FastAPI(title="kvslim engine", lifespan=lifespan)
    app.state.engine = runner
    install_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes or BODY_BYTES_PER_CHAR * CHARS_PER_TOKEN * max_len)

    def checked(body: CompletionRequest | ChatRequest) -> SamplingParams:
        """What can be refused from the body alone, before any tokenizing."""
        if body.model is not None and body.model != model_name:
            raise APIError(404, f"the model {body.model!r} does not exist here: this server serves {model_name!r} "
                                "(GET /v1/models)", param="model", code="model_not_found")
        if body.n > max_n:
            raise APIError(400, f"n={body.n} is more completions than this server gives for one request ({max_n}): "
                                "ask for fewer, or start the server with a larger --max-n", param="n")
        check_prompt_chars(body.prompt_chars(), max_len)
        return body.params()

    async def run(request: Request, prompt: Callable[[], "str | list[int]"], params: SamplingParams, chat: bool,
                  stream: bool, body: bool = True) -> Any:
        """Tokenize (off the event loop), submit, answer; ``body=False`` returns the finished RequestOutput."""
        if runner.error is not None:
            raise runner.dead()

        def tokenize() -> list[int]:  # in a worker thread: a long prompt must not hold up the event loop
            ids = engine.encode(prompt())
            engine.check(len(ids), params)
            return ids

        try:
            ids = await run_in_threadpool(tokenize)
        except ValueError as err:
            raise APIError(400, str(err)) from None
        watch = _Watch(request, runner, *runner.submit(ids, params, deltas=stream))
        try:
            first = await watch.next()
        except BaseException:
            watch.close()
            raise
        if first is None or isinstance(first, APIError) or not stream:
            watch.close()
            if first is None:
                return APIError(499, "the client closed the connection").response()  # nobody reads it
            if isinstance(first, APIError):
                raise first
            return completion_body(first, chat, model_name) if body else first
        return StreamingResponse(_sse(watch, first, chat, model_name), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        params, prompts = checked(body), body.prompts()
        if len(prompts) == 1:
            return await run(request, lambda: prompts[0], params, chat=False, stream=body.stream)
        if body.stream:
            raise APIError(400, f"stream=true with {len(prompts)} prompts: stream one prompt per request, or set "
                                "stream to false for a batch", param="stream")
        # Every prompt is its own engine request, batched by the scheduler; if one fails, the others are aborted.
        tasks = [asyncio.ensure_future(run(request, lambda p=p: p, params, chat=False, stream=False, body=False))
                 for p in prompts]
        try:
            outputs = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        if any(not isinstance(o, RequestOutput) for o in outputs):  # the client went away
            return next(o for o in outputs if not isinstance(o, RequestOutput))
        return batch_completion_body(outputs, model_name)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Any:
        return await run(request, lambda: _chat_prompt(engine, body.messages), checked(body), chat=True,
                         stream=body.stream)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(model_name, created)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        if name != model_name:
            raise APIError(404, f"the model {name!r} does not exist here: this server serves {model_name!r}",
                           param="model", code="model_not_found")
        return model_card(model_name, created)

    @app.get("/health")
    async def health() -> dict[str, str]:
        if runner.error is not None:
            raise runner.dead()
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> str:
        m = runner.metrics()  # no waiting for a step
        lines = [
            ("kvslim_up", "gauge", "whether the engine loop runs (0: see /health)", int(runner.error is None)),
            ("kvslim_requests_waiting", "gauge", "requests waiting for KV blocks", m["waiting"]),
            ("kvslim_requests_running", "gauge", "sequences admitted (decoding, or prefilling in chunks)", m["running"]),
            ("kvslim_kv_blocks_used", "gauge", "KV blocks held", m["blocks_used"]),
            ("kvslim_kv_blocks_free", "gauge", "KV blocks free", m["blocks_free"]),
            ("kvslim_preemptions_total", "counter", "sequences preempted (recomputed later)", m["preemptions"]),
            ("kvslim_generated_tokens_total", "counter", "tokens generated", m["generated_tokens"]),
            ("kvslim_requests_finished_total", "counter", "requests finished", m["finished"]),
            ("kvslim_requests_aborted_total", "counter", "requests aborted (client gone)", m["aborted"]),
            ("kvslim_requests_failed_total", "counter", "requests failed by an engine error (500)", m["failed"]),
        ]
        latency = {k: "NaN" if v is None else v for k, v in m["latency"].items()}  # NaN: no request finished yet
        lines += [
            ("kvslim_ttft_p50_seconds", "gauge", "median time to first token of recent requests", latency["ttft_p50_s"]),
            ("kvslim_ttft_p99_seconds", "gauge", "99th percentile time to first token", latency["ttft_p99_s"]),
            ("kvslim_itl_p50_seconds", "gauge", "median inter-token latency of recent requests", latency["itl_p50_s"]),
            ("kvslim_itl_p99_seconds", "gauge", "99th percentile inter-token latency", latency["itl_p99_s"]),
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


async def _sse(watch: _Watch, item: "Delta | RequestOutput | APIError | None", chat: bool,
               model: str) -> AsyncIterator[str]:
    try:
        while item is not None:
            if isinstance(item, Delta):
                yield text_event(watch.request_id, chat, model, item.index, item.text)
            elif isinstance(item, APIError):
                yield error_event(item)
                return
            else:
                yield final_events(item, chat, model)
                return
            item = await watch.next()
    finally:
        watch.close()  # no-op when it finished; frees the blocks when the client went away


def app_from_env() -> FastAPI:
    """For uvicorn's --factory: KVSLIM_MODEL (anything ``--model`` takes), KVSLIM_POLICY, KVSLIM_KV_MEMORY (GiB), KVSLIM_DEVICE,
    KVSLIM_KV_CACHE_DTYPE and KVSLIM_KV_SCALE (``--kv-cache-dtype``, ``--kv-scale``)."""
    from ..engine import LLM

    name = os.environ.get("KVSLIM_MODEL", "smollm2-135m")
    memory = os.environ.get("KVSLIM_KV_MEMORY")
    llm = LLM(name, policy=os.environ.get("KVSLIM_POLICY", "full"), kv_memory=float(memory) if memory else None,
              device=os.environ.get("KVSLIM_DEVICE", "cpu"),
              kv_cache_dtype=os.environ.get("KVSLIM_KV_CACHE_DTYPE", "auto"), kv_scale=os.environ.get("KVSLIM_KV_SCALE"))
    return create_app(llm, name)
