"""The OpenAI wire format: request bodies (pydantic) and the JSON the server answers with."""
from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, Field

from ..engine import RequestOutput, SamplingParams
from .errors import APIError


class _Sampling(BaseModel):
    """Sampling fields shared by both endpoints (``top_k`` and ``ignore_eos`` are vLLM's extensions)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    stop: str | list[str] | None = None
    stream: bool = False
    ignore_eos: bool = False
    seed: int | None = None
    model: str | None = None

    def params(self) -> SamplingParams:
        """The engine's SamplingParams; a value it refuses is a 400 naming the field."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        try:
            return SamplingParams(self.max_tokens, self.temperature, self.top_p, stop, self.ignore_eos, self.n,
                                  self.seed, self.top_k)
        except ValueError as err:
            field = str(err).split("=", 1)[0]
            raise APIError(400, str(err), param=field if field in type(self).model_fields else None) from None


class CompletionRequest(_Sampling):
    """``prompt``: a string or token ids, or a list of either (OpenAI's batch form: ``n`` choices per prompt,
    indexed prompt by prompt)."""

    prompt: str | list[int] | list[str] | list[list[int]]

    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]  # type: ignore[list-item]
        if not self.prompt:
            raise APIError(400, "prompt is an empty list: give a string, token ids, or a list of strings", "prompt")
        return list(self.prompt)  # type: ignore[arg-type]

    def prompt_chars(self) -> int:
        return sum(len(p) for p in self.prompts() if isinstance(p, str))


class TextPart(BaseModel):
    """One part of a message's content; only text reaches a language model."""

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: str
    content: str | list[TextPart]

    def text(self) -> str:
        """The content as one string (text parts joined, as OpenAI concatenates them)."""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)

    def prompt_chars(self) -> int:
        return sum(len(m.text()) + len(m.role) for m in self.messages)


def model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "kvslim"}


def usage(output: RequestOutput) -> dict[str, Any]:
    stats = output.stats
    return {"prompt_tokens": stats["prompt_tokens"], "completion_tokens": stats["completion_tokens"],
            "total_tokens": stats["prompt_tokens"] + stats["completion_tokens"], "kvslim": stats}


def completion_body(output: RequestOutput, chat: bool, model: str) -> dict[str, Any]:
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason}
                   for i, c in enumerate(output.completions)]
    else:
        choices = [{"index": i, "text": c.text, "finish_reason": c.finish_reason}
                   for i, c in enumerate(output.completions)]
    return {"id": output.request_id, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices, "usage": usage(output)}


def batch_completion_body(outputs: list[RequestOutput], model: str) -> dict[str, Any]:
    """One body for a list of prompts: prompt ``i``'s ``n`` choices take indexes ``i*n .. i*n+n-1``; usage summed,
    kvslim's per-request statistics kept per prompt."""
    choices = [{"index": len(o.completions) * i + j, "text": c.text, "finish_reason": c.finish_reason}
               for i, o in enumerate(outputs) for j, c in enumerate(o.completions)]
    each = [usage(o) for o in outputs]
    counts = {k: sum(u[k] for u in each) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    return {"id": outputs[0].request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": {**counts, "kvslim": [u["kvslim"] for u in each]}}


def text_event(request_id: str, chat: bool, model: str, index: int, text: str) -> str:
    """One server-sent event carrying text a completion gained."""
    piece = {"index": index, "delta": {"content": text}} if chat else {"index": index, "text": text}
    return _event(request_id, chat, model, [piece])


def final_events(output: RequestOutput, chat: bool, model: str) -> str:
    """The last chunk (every completion's finish reason, and the usage), then ``[DONE]``."""
    ends = [({"index": i, "delta": {}} if chat else {"index": i, "text": ""}) | {"finish_reason": c.finish_reason}
            for i, c in enumerate(output.completions)]
    return _event(output.request_id, chat, model, ends, usage(output)) + "data: [DONE]\n\n"


def error_event(error: APIError) -> str:
    """An error after the stream began (its 200 is already sent), in the shape OpenAI streams one."""
    return f"data: {json.dumps(error.body())}\n\n"


def _event(request_id: str, chat: bool, model: str, choices: list[dict], counts: dict | None = None) -> str:
    chunk: dict[str, Any] = {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                             "created": int(time.time()), "model": model, "choices": choices}
    if counts:
        chunk["usage"] = counts
    return f"data: {json.dumps(chunk)}\n\n"
