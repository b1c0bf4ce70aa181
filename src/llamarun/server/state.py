"""The one `ServerState` a server is built around. create_app keeps it on `app.state.server`, so
route functions live at module level and read it with `get_state(request)`."""

from __future__ import annotations

import time
from dataclasses import dataclass

from fastapi import Request

from ..errors import TokenizerError
from ..llm import LLM
from ..tokenizer import Tokenizer
from ..tokenizer.chat import ChatFormat
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
        return cls(
            llm=llm,
            tokenizer=tokenizer,
            scheduler=Scheduler(llm),
            model_name=model_name,
            chat_format=chat_format,
            no_chat=no_chat,
            api_key=api_key,
            created=int(time.time()),
        )


def get_state(request: Request) -> ServerState:
    return request.app.state.server
