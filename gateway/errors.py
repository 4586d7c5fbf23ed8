"""API errors as typed exceptions, mapped in one place to a status and OpenAI's error body."""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisClusterException, RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from broker.schemas import CLIENT_ERRORS, ErrorCode


class APIError(Exception):
    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


class InvalidRequest(APIError):
    pass


class ModelNotFound(APIError):
    status = 404

    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model '{model}' does not exist or has no live worker.",
            param="model",
            code="model_not_found",
        )


class ModelUnavailable(APIError):
    """The model has been served here (its stream exists) but no worker is alive for it now."""

    status = 503
    type = "server_error"

    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model '{model}' has no live worker right now.", param="model", code="model_unavailable"
        )
        self.headers = {"Retry-After": "5"}


class Backlogged(APIError):
    status = 429
    type = "rate_limit_error"

    def __init__(self, model: str, waiting: int) -> None:
        super().__init__(
            f"The model '{model}' has {waiting} requests waiting; retry shortly.",
            param="model",
            code="backlog_full",
        )
        self.headers = {"Retry-After": "2"}


class DeadlineExceeded(APIError):
    status = 504
    type = "timeout_error"

    def __init__(self) -> None:
        super().__init__("The request's deadline passed before it finished.", code="deadline_exceeded")


class GenerationFailed(APIError):
    """The worker reported an error for this request."""

    status = 500
    type = "server_error"

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message, code=code)
        if code in CLIENT_ERRORS:
            self.status, self.type = 400, "invalid_request_error"
        elif code == "deadline_exceeded":
            self.status, self.type = 504, "timeout_error"
        elif code == "upstream_error":  # an API-backed model's server failed or refused
            self.status = 502


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _validation_param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def on_api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body("The body is not valid JSON.", "invalid_request_error"), 400)
        param = _validation_param(tuple(first.get("loc", ())))
        message = f"{param}: {first.get('msg', 'invalid value')}" if param else str(first.get("msg"))
        return JSONResponse(error_body(message, "invalid_request_error", param, "invalid_value"), 400)

    async def on_redis_error(_: Request, exc: Exception) -> JSONResponse:
        body = error_body(
            "The queue is unreachable; retry shortly.", "server_error", None, "queue_unavailable"
        )
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})

    # A cluster mid-failover raises the second kind (a slot no live master serves yet).
    app.add_exception_handler(RedisError, on_redis_error)
    app.add_exception_handler(RedisClusterException, on_redis_error)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), type_), exc.status_code)


def sse_error(code: str, message: str) -> str:
    """The SSE chunk for an error after a stream has started (the openai client raises on it)."""
    return f"data: {json.dumps(error_body(message, 'server_error', None, code))}\n\n"
