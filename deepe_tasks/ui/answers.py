"""The API's error answers: each one a JSON body whose ``detail`` says what to fix.

Every answer is written as ASCII JSON: a value the API refuses may hold what UTF-8 cannot
encode (a lone surrogate, valid in JSON as ``"\\udc80"``), and the refusal must not become a 500.
"""

from __future__ import annotations

import json
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from deepe_tasks.core.connection import get_redis, unreachable
from deepe_tasks.core.errors import (
    BrokerUnavailable,
    DeepeError,
    InvalidJobState,
    JobExists,
    JobNotFound,
    MethodNotFound,
)


class AsciiJSON(JSONResponse):
    """JSON with every non-ASCII character escaped: it encodes whatever a client sent."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


async def deepe_error(request: Request, exc: Exception) -> JSONResponse:
    """A deepe error as an HTTP answer: the message says what to fix."""
    if isinstance(exc, JobNotFound) or (isinstance(exc, MethodNotFound) and request.method == "GET"):
        code = 404
    elif isinstance(exc, (InvalidJobState, JobExists)):
        code = 409
    elif isinstance(exc, BrokerUnavailable):
        code = 503
    else:
        code = 422  # bad input
    return AsciiJSON({"detail": str(exc)}, status_code=code)


async def redis_down(request: Request, exc: Exception) -> JSONResponse:
    """Redis refused, timed out or is loading after a restart: try again, not a broken API."""
    return AsciiJSON({"detail": str(unreachable(get_redis(), exc))}, status_code=503, headers={"Retry-After": "5"})


async def invalid_request(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's own 422 for a body of the wrong shape, written so that any value in it encodes."""
    assert isinstance(exc, RequestValidationError)
    return AsciiJSON({"detail": jsonable_encoder(exc.errors())}, status_code=422)


def install(app: FastAPI) -> None:
    app.add_exception_handler(DeepeError, deepe_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    for down in (redis.ConnectionError, redis.TimeoutError):
        app.add_exception_handler(down, redis_down)
