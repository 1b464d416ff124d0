"""Limits applied before a request costs anything: body size (413) and prompt length (400), read on arrival.

A 20 MB prompt used to be read, parsed and tokenized whole (tens of seconds, gigabytes) before being
refused for its length. Here the body is cut off once it passes ``max_bytes``, and a text prompt longer
than any context could hold is refused by its character count, before the tokenizer sees it.
(FastAPI's own ``max_body_size``, in its newest releases only, answers a declared oversize body in plain
text, not in the OpenAI error shape clients parse.)
"""
from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError

#: A token is rarely longer than this many characters, so a text longer than this many per token of the
#: context cannot fit and is refused without tokenizing it (8192-token context: 256k characters).
CHARS_PER_TOKEN = 32
#: JSON bytes per prompt character allowed in a body by default (escapes such as \u00e9 take six).
BODY_BYTES_PER_CHAR = 8


class BodyLimit:
    """ASGI middleware: 413 for a body over ``max_bytes``, by its Content-Length or as it streams in."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self, size: str) -> APIError:
        return APIError(413, f"request body of {size} bytes is over this server's limit of {self.max_bytes} bytes: "
                             "send a shorter prompt", code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self._too_large(length.decode()).response()(scope, receive, send)
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise self._too_large(f"more than {received}")  # answered by the app's APIError handler
            return message

        await self.app(scope, limited, send)


def check_prompt_chars(chars: int, max_model_len: int) -> None:
    """Refuse a text prompt (or chat) too long for the context without tokenizing it."""
    limit = CHARS_PER_TOKEN * max_model_len
    if chars > limit:
        raise APIError(400, f"prompt of {chars} characters cannot fit the model's context of {max_model_len} tokens "
                            f"(at most {limit} characters are tokenized): shorten it", param="prompt",
                       code="context_length_exceeded")
