"""OpenAI-style error bodies, ``{"error": {"message", "type", "param", "code"}}``, for every 4xx and 5xx.

OpenAI clients read ``error.message`` (and raise typed exceptions from the status), so every failure is
answered in that shape: ours (:class:`APIError`), FastAPI's validation errors (400, naming the field),
Starlette's HTTP errors (404 for an unknown path, 405...) and anything unexpected (500).
"""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException


class APIError(HTTPException):
    """A request answered with an error: HTTP ``status`` and the OpenAI error fields. An HTTPException, so
    FastAPI passes it through unchanged when it is raised while the body is read (see :mod:`.limits`)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None):
        super().__init__(status, message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _validation(errors: list[dict]) -> APIError:
    """One 400 naming every bad field (``messages.0.content: Input should be a valid string``)."""
    def where(error: dict) -> str:
        loc = [str(part) for part in error.get("loc", ())]
        return ".".join(loc[1:] if loc[:1] == ["body"] else loc) or "body"

    message = "; ".join(f"{where(e)}: {e.get('msg', 'invalid')}" for e in errors) or "invalid request"
    return APIError(400, message, param=where(errors[0]) if errors else None)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        return _validation(list(err.errors())).response()

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException) -> JSONResponse:
        return APIError(err.status_code, str(err.detail)).response()

    @app.exception_handler(Exception)
    async def unexpected(_: Request, err: Exception) -> JSONResponse:  # Starlette logs the traceback
        return APIError(500, f"internal error: {type(err).__name__}: {err}").response()
