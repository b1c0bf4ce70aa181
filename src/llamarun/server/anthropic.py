"""Anthropic's Messages API: POST /v1/messages (JSON, or server-sent events with stream=true) and
POST /v1/messages/count_tokens, behind the server's --api-key (x-api-key or a Bearer token; the
anthropic-version header is accepted and not needed). Requests become one `Generation` on the
same engine and scheduler as every other API; failures answer in Anthropic's error shape
{"type": "error", "error": {"type", "message"}}, in the stream as an `error` event.

Usage: input_tokens counts the whole prompt. The server's prefix cache is automatic and not
Anthropic's cache_control, so cache_read/cache_creation_input_tokens are left out (apps add them
to input_tokens for the context size, which would count reused tokens twice)."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.sse import EventSourceResponse, format_sse_event
from pydantic import BaseModel, Field

from ..errors import RequestError
from ..sampling import SamplingParams
from .http_errors import APIError, Failure, error_route, failure_of
from .jobs import Generation, token_budget
from .state import ServerState, get_state, require_key

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
STOP_REASONS = {"length": "max_tokens"}  # "stop": end_turn, or stop_sequence when a string cut it


def anthropic_error(f: Failure) -> dict:
    kind = ERROR_TYPES.get(f.status, "api_error" if f.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": f.message}}


router = APIRouter(
    prefix="/v1", dependencies=[Depends(require_key)], route_class=error_route(anthropic_error)
)


# ---- wire types ------------------------------------------------------------------------------


class TextBlock(BaseModel):
    type: Literal["text"]
    text: str


class ToolUseBlock(BaseModel):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(BaseModel):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] = ""
    is_error: bool = False


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock, Field(discriminator="type")]


class MessageParam(BaseModel):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class ToolParam(BaseModel):
    name: str = Field(min_length=1)
    description: str | None = None
    input_schema: dict[str, Any]


class CountTokensRequest(BaseModel):
    model: str
    messages: list[MessageParam] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[ToolParam] | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[Annotated[str, Field(min_length=1)]] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    stream: bool = False

    def to_sampling_params(self, max_new_tokens: int) -> SamplingParams:
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or None,
            max_new_tokens=max_new_tokens,
            stop=tuple(self.stop_sequences or ()),
        )


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int


class Message(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[TextBlock]
    stop_reason: str | None = None
    stop_sequence: str | None = None
    usage: Usage


# ---- routes ----------------------------------------------------------------------------------


@router.post("/messages", response_model=None)
async def messages(body: MessagesRequest, request: Request) -> Message | EventSourceResponse:
    state = get_state(request)
    prompt_ids = encode(state, body)
    budget = token_budget(state.llm, prompt_ids, body.max_tokens)
    gen = Generation.start(state, request, prompt_ids, body.to_sampling_params(budget), chat=True)
    message = Message(
        id=f"msg_{secrets.token_hex(12)}",
        model=state.model_name,
        content=[],
        usage=Usage(input_tokens=len(prompt_ids), output_tokens=0),
    )
    if body.stream:
        return EventSourceResponse(stream_events(gen, message))
    text, reason = "", "length"
    async for ev in gen.run(watch=True):
        text += ev.text
        reason = ev.finish_reason or reason
    finish(message, gen, reason)
    message.content = [TextBlock(type="text", text=text)]
    return message


@router.post("/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, request: Request) -> dict:
    return {"input_tokens": len(encode(get_state(request), body))}


def encode(state: ServerState, body: CountTokensRequest) -> list[int]:
    """The prompt ids of the request's system prompt and messages, in the model's chat format."""
    if body.model != state.model_name:
        raise APIError(
            404, f"model: '{body.model}' not found: this server serves '{state.model_name}'"
        )
    if state.no_chat is not None:
        raise RequestError(state.no_chat, param="messages")
    if body.tools:
        raise RequestError(
            "tools are not available on this server's Messages API yet", param="tools"
        )
    dialog = [{"role": "system", "content": text_of(body.system)}] if body.system else []
    dialog += [{"role": m.role, "content": text_of(m.content)} for m in body.messages]
    return list(state.chat_format.encode_dialog(dialog, add_generation_prompt=True))


def text_of(content: str | list) -> str:
    if isinstance(content, str):
        return content
    if any(block.type != "text" for block in content):
        raise RequestError(
            "tool_use and tool_result blocks need tools, which this server's Messages API does "
            "not offer yet: send text blocks",
            param="messages",
        )
    return "".join(block.text for block in content)


def finish(message: Message, gen: Generation, reason: str) -> None:
    message.usage.output_tokens = gen.completion_tokens
    stop = gen.stop_string
    message.stop_reason = "stop_sequence" if stop else STOP_REASONS.get(reason, "end_turn")
    message.stop_sequence = stop


def sse(event: str, data: dict) -> bytes:
    return format_sse_event(event=event, data_str=json.dumps(data))


async def stream_events(gen: Generation, message: Message) -> AsyncIterator[bytes]:
    """message_start, a ping, one text block's start/deltas/stop, message_delta, message_stop;
    a failure after the 200 is sent is an `error` event."""
    yield sse("message_start", {"type": "message_start", "message": message.model_dump()})
    yield sse("ping", {"type": "ping"})
    block = {"type": "text", "text": ""}
    yield sse(
        "content_block_start", {"type": "content_block_start", "index": 0, "content_block": block}
    )
    reason = "length"
    try:
        async for ev in gen.run(watch=False):
            if ev.text:
                delta = {"type": "text_delta", "text": ev.text}
                yield sse(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": 0, "delta": delta},
                )
            reason = ev.finish_reason or reason
    except Exception as e:  # the status line has gone: the stream carries the error
        yield sse("error", anthropic_error(failure_of(e)))
        return
    yield sse("content_block_stop", {"type": "content_block_stop", "index": 0})
    finish(message, gen, reason)
    delta = {"stop_reason": message.stop_reason, "stop_sequence": message.stop_sequence}
    usage = {"output_tokens": message.usage.output_tokens}
    yield sse("message_delta", {"type": "message_delta", "delta": delta, "usage": usage})
    yield sse("message_stop", {"type": "message_stop"})
