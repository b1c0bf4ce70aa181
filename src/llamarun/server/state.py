"""The one `ServerState` a server is built around. create_app keeps it on `app.state.server`, so
route functions live at module level and read it with `get_state(request)`."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

from fastapi import Request

from ..errors import TokenizerError
from ..llm import LLM
from ..tokenizer import Tokenizer
from ..tokenizer.chat import ChatFormat
from .http_errors import APIError
from .metrics import Metrics
from .scheduler import Scheduler

NO_CHAT = (
    "this model has no chat template or chat tokens, so it only continues text: use "
    "/v1/completions, or restart the server with --chat-template NAME|FILE"
)


@dataclass
class ServerState:
    llm: LLM
    tokenizer: Tokenizer
    scheduler: Scheduler
    model_name: str
    chat_format: ChatFormat | None
    no_chat: str | None  # why chat is refused (a base model); None when chat_format is set
    api_key: str | None
    created: int  # the model card's creation time: when the server was built
    metrics: Metrics

    @classmethod
    def create(
        cls,
        llm: LLM,
        *,
        model_name: str,
        api_key: str | None = None,
        chat_format: ChatFormat | None = None,
    ) -> ServerState:
        """chat_format: renders chat messages (default: the model's own, `llm.chat_format`)."""
        tokenizer = llm.tokenizer
        if tokenizer is None:
            raise TokenizerError("the server needs a tokenizer: pass --tokenizer PATH")
        no_chat = None
        if chat_format is None:
            try:
                chat_format = llm.chat_format
            except TokenizerError:
                no_chat = NO_CHAT
        metrics = Metrics()
        scheduler = Scheduler(llm, observer=metrics)
        metrics.watch(scheduler)
        return cls(
            llm=llm,
            tokenizer=tokenizer,
            scheduler=scheduler,
            model_name=model_name,
            chat_format=chat_format,
            no_chat=no_chat,
            api_key=api_key,
            created=int(time.time()),
            metrics=metrics,
        )


def get_state(request: Request) -> ServerState:
    return request.app.state.server


async def require_key(request: Request) -> None:
    """The server's --api-key, as OpenAI's clients send it (Authorization: Bearer KEY) or as
    Anthropic's (x-api-key: KEY); a route dependency, so each API answers in its own shape."""
    api_key = get_state(request).api_key
    if api_key is None:
        return
    bearer = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    given = request.headers.get("x-api-key", "").strip() or bearer
    if not secrets.compare_digest(given.encode(), api_key.encode()):
        raise APIError(
            401,
            "missing or incorrect API key: send the server's --api-key as the header "
            "'Authorization: Bearer KEY' or 'x-api-key: KEY'",
            code="invalid_api_key",
        )
