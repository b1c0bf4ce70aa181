"""How a failure becomes an HTTP answer with an OpenAI error body: our own `APIError` keeps its
status, a `LlamarunError` is the request's fault (400), FastAPI's validation and HTTP errors are
reworded to name the parameter, and anything else is logged and answered 500."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..errors import LlamarunError
from . import builders as b

log = logging.getLogger("llamarun.server")


class APIError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.body = status, b.error_body(message, "invalid_request_error", param, code)


def error_response(e: Exception) -> tuple[int, dict]:
    if isinstance(e, APIError):
        return e.status, e.body
    if isinstance(e, LlamarunError):
        return 400, b.error_body(str(e), param=getattr(e, "param", None), code=400)
    log.error("request failed", exc_info=e)
    return 500, b.error_body(f"internal error: {type(e).__name__}: {e}", "server_error", code=500)


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(Exception, on_error)
    # Starlette answers `Exception` in its outermost middleware and then re-raises it (uvicorn logs
    # a traceback); errors that are the request's fault get their own entry, answered quietly.
    for kind in (APIError, LlamarunError):
        app.add_exception_handler(kind, on_error)
    app.add_exception_handler(RequestValidationError, on_invalid)
    app.add_exception_handler(HTTPException, on_http_error)


async def on_error(request: Request, e: Exception) -> JSONResponse:
    status, body = error_response(e)
    return JSONResponse(body, status_code=status)


async def on_invalid(request: Request, e: RequestValidationError) -> JSONResponse:
    err = e.errors()[0]
    if err.get("type") == "json_invalid":
        return JSONResponse(
            b.error_body("the request body is not valid JSON", code=400), status_code=400
        )
    param = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or None
    got = (
        f", got {err['input']!r}"
        if not isinstance(err.get("input"), dict | list | type(None))
        else ""
    )
    return JSONResponse(
        b.error_body(f"{param or 'body'}: {err['msg']}{got}", param=param, code=400),
        status_code=400,
    )


async def on_http_error(request: Request, e: HTTPException) -> JSONResponse:
    return JSONResponse(b.error_body(str(e.detail), code=e.status_code), status_code=e.status_code)
