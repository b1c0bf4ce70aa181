"""How a failure becomes an HTTP answer. `failure_of` is the one place a failure gets its status
and sentence: our own `APIError` keeps its status, a `LlamarunError` is the request's fault (400),
FastAPI's validation and HTTP errors are reworded to name the parameter, and anything else is
logged and answered 500. Each API then writes that failure in its own error shape: the app's
handlers answer in OpenAI's; a router of another API uses `error_route(its_renderer)` as its
route class, so what its routes raise (validation included) is answered in that API's shape."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from ..errors import DistributedError, LlamarunError
from . import builders as b

log = logging.getLogger("llamarun.server")


class APIError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code
        self.body = b.error_body(message, "invalid_request_error", param, code)


@dataclass
class Failure:
    status: int
    message: str
    param: str | None = None
    code: int | str | None = None  # OpenAI's `code` (a status, or a name like model_not_found)


def failure_of(e: Exception) -> Failure:
    if isinstance(e, APIError):
        return Failure(e.status, str(e), e.param, e.code)
    if isinstance(e, DistributedError):  # a lost rank: the server, not the request, is at fault
        return Failure(503, str(e), None, 503)
    if isinstance(e, LlamarunError):
        return Failure(400, str(e), getattr(e, "param", None), 400)
    if isinstance(e, RequestValidationError):
        return validation_failure(e)
    if isinstance(e, HTTPException):
        return Failure(e.status_code, str(e.detail), None, e.status_code)
    log.error("request failed", exc_info=e)
    return Failure(500, f"internal error: {type(e).__name__}: {e}", None, 500)


def validation_failure(e: RequestValidationError) -> Failure:
    err = e.errors()[0]
    if err.get("type") == "json_invalid":
        return Failure(400, "the request body is not valid JSON", None, 400)
    param = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or None
    got = (
        f", got {err['input']!r}"
        if not isinstance(err.get("input"), dict | list | type(None))
        else ""
    )
    return Failure(400, f"{param or 'body'}: {err['msg']}{got}", param, 400)


def openai_error(f: Failure) -> dict:
    kind = "server_error" if f.status >= 500 else "invalid_request_error"
    return b.error_body(f.message, kind, f.param, f.code)


def error_response(e: Exception) -> tuple[int, dict]:
    """The status and OpenAI error body for `e`."""
    f = failure_of(e)
    return f.status, openai_error(f)


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(Exception, on_error)
    # Starlette answers `Exception` in its outermost middleware and then re-raises it (uvicorn logs
    # a traceback); errors that are the request's fault get their own entry, answered quietly.
    for kind in (APIError, LlamarunError, RequestValidationError, HTTPException):
        app.add_exception_handler(kind, on_error)


async def on_error(request: Request, e: Exception) -> JSONResponse:
    status, body = error_response(e)
    return JSONResponse(body, status_code=status)


def error_route(render: Callable[[Failure], dict]) -> type[APIRoute]:
    """A route class whose routes answer any failure with `render(failure)` at its status."""

    class ErrorShapedRoute(APIRoute):
        def get_route_handler(self) -> Callable:
            handle = super().get_route_handler()

            async def handler(request: Request) -> Response:
                try:
                    return await handle(request)
                except Exception as e:  # body validation, our errors and bugs alike
                    f = failure_of(e)
                    return JSONResponse(render(f), status_code=f.status)

            return handler

    return ErrorShapedRoute
