"""The HTTP server: `create_app` builds the one `ServerState` (state.py), installs the error
handlers (http_errors.py) and assembles the routers around them: the OpenAI API (openai.py,
responses.py), Anthropic's (anthropic.py), ollama's (ollama.py), /tokenize and /detokenize
(tokenize.py), /metrics (metrics.py, which also counts every request), /health (with speculative
decoding's figures), and the chat page at / (ui.py). A router module reads the state from
`request.app.state`, so adding an API is one more module and one more `include_router` here; each
answers errors in its API's shape."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request

from ..llm import LLM
from ..tokenizer.chat import ChatFormat
from . import anthropic, metrics, ollama, openai, responses, tokenize, ui
from .http_errors import add_error_handlers
from .state import ServerState, get_state, require_key

health_router = APIRouter()


def create_app(
    llm: LLM, *, model_name: str, api_key: str | None = None, chat_format: ChatFormat | None = None
) -> FastAPI:
    """chat_format: renders chat messages (default: the model's own, `llm.chat_format`)."""
    state = ServerState.create(llm, model_name=model_name, api_key=api_key, chat_format=chat_format)
    app = FastAPI(title="llamarun", lifespan=lifespan)
    app.state.server = state
    app.state.scheduler = state.scheduler  # where tests and tools reach the engine thread
    add_error_handlers(app)
    app.include_router(health_router)
    app.include_router(openai.router)
    app.include_router(responses.router)
    app.include_router(anthropic.router)
    app.include_router(ollama.router)
    app.include_router(tokenize.router, dependencies=[Depends(require_key)])
    app.include_router(metrics.router, dependencies=[Depends(require_key)])
    app.add_middleware(metrics.CountRequests, metrics=state.metrics)
    app.include_router(ui.router)
    return app


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    scheduler = app.state.server.scheduler
    scheduler.start()
    yield
    await asyncio.to_thread(scheduler.stop)  # uvicorn has already let in-flight requests finish


@health_router.get("/health")
async def health(request: Request) -> dict:
    scheduler = get_state(request).scheduler
    speculation = scheduler.llm.speculation  # batched_steps: steps that decoded plainly, not alone
    return {
        "status": "ok",
        "running": len(scheduler.running),
        "waiting": len(scheduler.waiting) + scheduler.inbox.qsize(),
        **({"speculation": speculation} if speculation is not None else {}),
    }
