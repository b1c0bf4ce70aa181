"""Anthropic's Messages API: POST /v1/messages (JSON, or server-sent events with stream=true) and
POST /v1/messages/count_tokens, behind the server's --api-key (x-api-key or a Bearer token; the
anthropic-version header is accepted and not needed). Requests become one `Generation` on the
same engine and scheduler as every other API; failures answer in Anthropic's error shape
{"type": "error", "error": {"type", "message"}}, in the stream as an `error` event.

Tools go through the tool-calling machinery of the chat completions route (llamarun.tools):
`tools` (name, description, input_schema) and `tool_choice` (auto, any, tool with its name,
none) become a ToolRequest, earlier tool_use blocks the assistant's calls and tool_result blocks
tool messages; the answer's calls come back as tool_use blocks with stop_reason "tool_use",
streamed as input_json_delta fragments. One call per answer unless tool_choice says
disable_parallel_tool_use: false (a small model offered more keeps calling until max_tokens).

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

from .. import tools
from ..errors import RequestError
from ..sampling import SamplingParams
from .http_errors import APIError, Failure, error_route, failure_of
from .jobs import Generation, chat_plan, token_budget
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
# "stop": end_turn, or stop_sequence when a string cut it
STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use"}
CHOICES = {"auto": "auto", "any": "required", "none": "none"}  # and "tool": that function


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


class ToolChoice(BaseModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class CountTokensRequest(BaseModel):
    model: str
    messages: list[MessageParam] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[ToolParam] | None = None
    tool_choice: ToolChoice | None = None

    def tool_request(self) -> tools.ToolRequest | None:
        """tools and tool_choice as the chat completions route's ToolRequest."""
        offered = [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    "parameters": t.input_schema,
                    **({"description": t.description} if t.description else {}),
                },
            }
            for t in self.tools or ()
        ]
        c = self.tool_choice
        choice = None if c is None else CHOICES.get(c.type)
        if c is not None and c.type == "tool":
            if c.name is None:
                raise RequestError("tool_choice of type tool needs the tool's name", "tool_choice")
            choice = {"type": "function", "function": {"name": c.name}}
        parallel = c is not None and c.disable_parallel_tool_use is False
        return tools.tool_request(offered, choice, parallel)


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
    content: list[TextBlock | ToolUseBlock]
    stop_reason: str | None = None
    stop_sequence: str | None = None
    usage: Usage


# ---- routes ----------------------------------------------------------------------------------


@router.post("/messages", response_model=None)
async def messages(body: MessagesRequest, request: Request) -> Message | EventSourceResponse:
    state = get_state(request)
    plan = encode(state, body)
    budget = token_budget(state.llm, plan.prompt_ids, body.max_tokens)
    params = plan.sampling(body.to_sampling_params(budget))
    gen = Generation.start(state, request, plan.prompt_ids, params, chat=True, reader=plan.reader)
    message = Message(
        id=f"msg_{secrets.token_hex(12)}",
        model=state.model_name,
        content=[],
        usage=Usage(input_tokens=len(plan.prompt_ids), output_tokens=0),
    )
    if body.stream:
        return EventSourceResponse(stream_events(gen, message))
    text, reason = "", "length"
    async for ev in gen.run(watch=True):
        text += ev.text
        reason = ev.finish_reason or reason
    content, calls, reason = gen.answer(text, reason)
    finish(message, gen, reason)
    message.content = blocks(content, calls)
    return message


@router.post("/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, request: Request) -> dict:
    return {"input_tokens": len(encode(get_state(request), body).prompt_ids)}


def encode(state: ServerState, body: CountTokensRequest) -> tools.ChatPlan:
    """The prompt of the request's system prompt, messages and tools in the model's chat
    format, with the reader of the answer's calls."""
    if body.model != state.model_name:
        raise APIError(
            404, f"model: '{body.model}' not found: this server serves '{state.model_name}'"
        )
    dialog = [{"role": "system", "content": text_of(body.system)}] if body.system else []
    for i, m in enumerate(body.messages):
        dialog += messages_of(m, i)
    return chat_plan(state, dialog, body.tool_request())


def messages_of(m: MessageParam, i: int) -> list[dict]:
    """One Anthropic message as chat messages: an assistant's tool_use blocks are its calls, a
    user's tool_result blocks each a tool message (before the user's own text, as Anthropic
    puts them first)."""
    if isinstance(m.content, str):
        return [{"role": m.role, "content": m.content}]
    wrong = "tool_result" if m.role == "assistant" else "tool_use"
    if any(block.type == wrong for block in m.content):
        raise RequestError(
            f"messages[{i}]: a {m.role} message cannot hold {wrong} blocks (tool_use blocks are "
            "the assistant's, tool_result blocks the user's)",
            param=f"messages.{i}.content",
        )
    text = "".join(block.text for block in m.content if block.type == "text")
    if m.role == "assistant":
        calls = [
            {
                "id": block.id,
                "type": "function",
                "function": {"name": block.name, "arguments": json.dumps(block.input)},
            }
            for block in m.content
            if block.type == "tool_use"
        ]
        return [
            {
                "role": "assistant",
                "content": text or None,
                **({"tool_calls": calls} if calls else {}),
            }
        ]
    out = [
        {"role": "tool", "tool_call_id": b.tool_use_id, "content": result_text(b)}
        for b in m.content
        if b.type == "tool_result"
    ]
    if text or not out:
        out.append({"role": "user", "content": text})
    return out


def result_text(block: ToolResultBlock) -> str:
    text = (
        block.content if isinstance(block.content, str) else "".join(t.text for t in block.content)
    )
    return f"Error: {text}" if block.is_error else text


def text_of(content: str | list[TextBlock]) -> str:
    return content if isinstance(content, str) else "".join(block.text for block in content)


def blocks(content: str | None, calls: list[tools.ToolCall]) -> list[TextBlock | ToolUseBlock]:
    """The answer's content blocks: its text (when there is any, or nothing else), then a
    tool_use block per call. A call cut by max_tokens has arguments that do not parse: its
    input is then {}, the stop_reason telling why."""
    out: list[TextBlock | ToolUseBlock] = []
    if content or not calls:
        out.append(TextBlock(type="text", text=content or ""))
    for call in calls:
        out.append(
            ToolUseBlock(type="tool_use", id=call.id, name=call.name, input=call.arguments_object())
        )
    return out


def finish(message: Message, gen: Generation, reason: str) -> None:
    message.usage.output_tokens = gen.completion_tokens
    stop = gen.stop_string
    message.stop_reason = "stop_sequence" if stop else STOP_REASONS.get(reason, "end_turn")
    message.stop_sequence = stop


def sse(event: str, data: dict) -> bytes:
    return format_sse_event(event=event, data_str=json.dumps(data))


async def stream_events(gen: Generation, message: Message) -> AsyncIterator[bytes]:
    """message_start, a ping, content blocks (a text block's text_delta events, a tool_use
    block's input_json_delta events), each opened and closed in turn, message_delta,
    message_stop; a failure after the 200 is sent is an `error` event."""
    yield sse("message_start", {"type": "message_start", "message": message.model_dump()})
    yield sse("ping", {"type": "ping"})
    blocks = Blocks()
    reason = "length"
    try:
        async for deltas, finished in gen.deltas():
            for d in deltas:
                for event in blocks.add(d):
                    yield event
            reason = finished or reason
    except Exception as e:  # the status line has gone: the stream carries the error
        yield sse("error", anthropic_error(failure_of(e)))
        return
    if blocks.open is None:  # an empty answer still has its (empty) text block
        yield blocks.start({"type": "text", "text": ""})
    yield blocks.stop()
    finish(message, gen, reason)
    delta = {"stop_reason": message.stop_reason, "stop_sequence": message.stop_sequence}
    usage = {"output_tokens": message.usage.output_tokens}
    yield sse("message_delta", {"type": "message_delta", "delta": delta, "usage": usage})
    yield sse("message_stop", {"type": "message_stop"})


class Blocks:
    """Content block events in order: a text delta extends the open text block (or opens one),
    a call's first delta opens a tool_use block, its argument fragments extend it."""

    def __init__(self):
        self.count = 0  # blocks opened so far
        self.open: str | None = None  # the open block's type

    def add(self, d: tools.Delta) -> list[bytes]:
        events = []
        if d.content:
            if self.open != "text":
                events += self.close() + [self.start({"type": "text", "text": ""})]
            delta = {"type": "text_delta", "text": d.content}
            events.append(self.delta(delta))
        elif d.id is not None:
            block = {"type": "tool_use", "id": d.id, "name": d.name, "input": {}}
            events += self.close() + [self.start(block)]
        if d.arguments:
            events.append(self.delta({"type": "input_json_delta", "partial_json": d.arguments}))
        return events

    def start(self, block: dict) -> bytes:
        self.open, self.count = block["type"], self.count + 1
        event = {"type": "content_block_start", "index": self.count - 1, "content_block": block}
        return sse("content_block_start", event)

    def delta(self, delta: dict) -> bytes:
        event = {"type": "content_block_delta", "index": self.count - 1, "delta": delta}
        return sse("content_block_delta", event)

    def stop(self) -> bytes:
        self.open = None
        return sse("content_block_stop", {"type": "content_block_stop", "index": self.count - 1})

    def close(self) -> list[bytes]:
        return [self.stop()] if self.open is not None else []
