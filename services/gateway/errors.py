"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Handlers raise `APIError` subclasses; the exception handlers installed by
`install_error_handlers` turn them (and FastAPI's own validation errors, which would
otherwise be 422s in FastAPI's shape) into OpenAI-shaped JSON, as vLLM does.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class APIError(Exception):
    status: int = 500
    type: str = "InternalServerError"
    headers: dict[str, str] = {}  # extra response headers (Retry-After on 429/503)

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.status)


class BadRequestError(APIError):
    status = 400
    type = "BadRequestError"


class AuthenticationError(APIError):
    status = 401
    type = "AuthenticationError"


class NotFoundError(APIError):
    status = 404
    type = "NotFoundError"


class PayloadTooLargeError(APIError):
    status = 413
    type = "PayloadTooLargeError"


class EngineError(APIError):
    """The engine failed a request (a TokenDelta carried an error)."""

    status = 500
    type = "InternalServerError"


class ServiceUnavailableError(APIError):
    status = 503
    type = "ServiceUnavailableError"
    headers = {"Retry-After": "1"}  # no engine, or draining: worth a retry (elsewhere) soon


def error_body(message: str, type_: str, param: str | None, code: int) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers or None)


def sse_error(err: APIError) -> str:
    """An error after streaming began: one `data:` event, then the stream's [DONE]."""
    return f"data: {json.dumps(err.body())}\n\ndata: [DONE]\n\n"


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "Invalid request.", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return f"Malformed JSON body: {first.get('msg', 'could not parse')}.", None
    param = loc[0] if loc else None
    where = ".".join(loc) or "body"
    parts = [f"{where}: {e.get('msg', 'invalid value')}" for e in errors[:3]]
    return "Invalid request: " + "; ".join(parts), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(BadRequestError(message, param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        phrase = HTTPStatus(exc.status_code).phrase.replace(" ", "")
        err = APIError(str(exc.detail))
        err.status, err.type = (
            exc.status_code,
            PayloadTooLargeError.type if exc.status_code == 413  # the same type however it was found
            else f"{phrase}Error" if exc.status_code < 500 else "InternalServerError",
        )
        return error_response(err)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error: %s", exc)
        return error_response(APIError(f"Internal server error: {type(exc).__name__}: {exc}"))
