"""OpenAI's Responses API: POST /v1/responses, answered as one Response object or, with
stream=true, as its event stream (response.created, response.in_progress, output_item.added,
content_part.added, output_text.delta..., output_text.done, content_part.done,
output_item.done, response.completed). One `Generation` on the shared scheduler per request.

Stateless: nothing is stored (store is accepted and has no effect), so a previous_response_id is
a 400 asking for the whole conversation as input. An answer cut by max_output_tokens has status
"incomplete" with incomplete_details, as OpenAI's; its stream still ends with response.completed,
whose response says so, so the client's stream helper (get_final_response) has its answer."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.sse import EventSourceResponse, format_sse_event
from pydantic import BaseModel, ConfigDict, Field

from ..errors import RequestError
from ..sampling import SamplingParams
from .http_errors import APIError, error_route, failure_of, openai_error
from .jobs import Generation, token_budget
from .state import ServerState, get_state, require_key

router = APIRouter(
    prefix="/v1", dependencies=[Depends(require_key)], route_class=error_route(openai_error)
)

ROLES = {"developer": "system"}  # OpenAI's newer name for the system role


# ---- requests --------------------------------------------------------------------------------


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class InputItem(BaseModel):
    """A message (the easy form without `type`, or type "message"); other item types are
    refused by name in `dialog_of`."""

    model_config = ConfigDict(extra="allow")
    type: str = "message"
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | list[ContentPart] | None = None


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_schema", "json_object"] = "text"


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="allow")
    format: TextFormat | None = None


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = None
    text: TextConfig | None = None
    tools: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None

    def to_sampling_params(self, max_new_tokens: int) -> SamplingParams:
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            max_new_tokens=max_new_tokens,
        )


# ---- the response ----------------------------------------------------------------------------


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str = ""
    annotations: list = []
    logprobs: list = []


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"] = "in_progress"
    role: Literal["assistant"] = "assistant"
    content: list[OutputText] = []


class InputTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens the prefix cache held, so not prefilled
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class Usage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = OutputTokensDetails()
    total_tokens: int


class Response(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"] = "in_progress"
    model: str
    output: list[OutputMessage] = []
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    parallel_tool_calls: bool = False
    tool_choice: str = "auto"
    tools: list = []
    text: dict = {"format": {"type": "text"}}
    store: bool = False  # nothing is kept, whatever the request asked
    previous_response_id: None = None
    incomplete_details: dict | None = None
    error: dict | None = None
    metadata: dict[str, str] = {}
    usage: Usage | None = None


# ---- the route -------------------------------------------------------------------------------


@router.post("/responses", response_model=None)
async def create_response(
    body: ResponsesRequest, request: Request
) -> Response | EventSourceResponse:
    state = get_state(request)
    prompt_ids = encode(state, body)
    budget = token_budget(state.llm, prompt_ids, body.max_output_tokens, "max_output_tokens")
    params = body.to_sampling_params(budget)
    gen = Generation.start(state, request, prompt_ids, params, chat=True)
    response = Response(
        id=f"resp_{secrets.token_hex(12)}",
        created_at=int(time.time()),
        model=state.model_name,
        instructions=body.instructions,
        max_output_tokens=body.max_output_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        metadata=body.metadata or {},
    )
    message = OutputMessage(id=f"msg_{secrets.token_hex(12)}")
    if body.stream:
        return EventSourceResponse(stream_events(gen, response, message))
    text, reason = "", "length"
    async for ev in gen.run(watch=True):
        text += ev.text
        reason = ev.finish_reason or reason
    return finish(response, message, gen, text, reason)


def encode(state: ServerState, body: ResponsesRequest) -> list[int]:
    if body.model is not None and body.model != state.model_name:
        raise APIError(
            404,
            f"the model '{body.model}' does not exist: this server serves '{state.model_name}'",
            "model",
            "model_not_found",
        )
    if body.previous_response_id is not None:
        raise APIError(
            400,
            f"previous_response_id '{body.previous_response_id}' is not known: this server stores "
            "no responses, so send the whole conversation as `input`",
            "previous_response_id",
            "previous_response_not_found",
        )
    if body.tools:
        raise RequestError(
            "tools are not available on this server's Responses API yet", param="tools"
        )
    if body.text is not None and body.text.format is not None and body.text.format.type != "text":
        raise RequestError(
            f"text.format {body.text.format.type} is not available on this server's Responses API yet",
            param="text.format",
        )
    if state.no_chat is not None:
        raise RequestError(state.no_chat, param="input")
    dialog = [{"role": "system", "content": body.instructions}] if body.instructions else []
    dialog += dialog_of(body.input)
    return list(state.chat_format.encode_dialog(dialog, add_generation_prompt=True))


def dialog_of(given: str | list[InputItem]) -> list[dict[str, str]]:
    """`input` as chat messages: a string is one user message; items are messages."""
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    if not given:
        raise RequestError("input is an empty list: give a string or messages", param="input")
    dialog = []
    for i, item in enumerate(given):
        if item.type != "message" or item.role is None:
            raise RequestError(
                f"input[{i}] is a {item.type!r} item: this server takes messages with a role",
                param=f"input.{i}",
            )
        dialog.append({"role": ROLES.get(item.role, item.role), "content": text_of(item, i)})
    return dialog


def text_of(item: InputItem, i: int) -> str:
    if isinstance(item.content, str) or item.content is None:
        return item.content or ""
    parts = item.content
    if any(p.type not in ("input_text", "output_text") or p.text is None for p in parts):
        raise RequestError(
            f"input[{i}].content: only input_text and output_text parts are supported",
            param=f"input.{i}.content",
        )
    return "".join(p.text for p in parts)


def finish(
    response: Response, message: OutputMessage, gen: Generation, text: str, reason: str
) -> Response:
    """The finished response: its message, status and usage."""
    cut = reason == "length"
    response.status = message.status = "incomplete" if cut else "completed"
    if cut:
        response.incomplete_details = {"reason": "max_output_tokens"}
    message.content = [OutputText(text=text)]
    response.output = [message]
    response.usage = Usage(
        input_tokens=gen.prompt_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=gen.cached_tokens),
        output_tokens=gen.completion_tokens,
        total_tokens=gen.prompt_tokens + gen.completion_tokens,
    )
    return response


async def stream_events(
    gen: Generation, response: Response, message: OutputMessage
) -> AsyncIterator[bytes]:
    counter = iter(range(1 << 62))

    def event(kind: str, **fields) -> bytes:
        data = {"type": kind, "sequence_number": next(counter), **fields}
        return format_sse_event(event=kind, data_str=json.dumps(data))

    where = {"item_id": message.id, "output_index": 0, "content_index": 0}
    yield event("response.created", response=response.model_dump())
    yield event("response.in_progress", response=response.model_dump())
    yield event("response.output_item.added", output_index=0, item=message.model_dump())
    yield event("response.content_part.added", **where, part=OutputText().model_dump())
    text, reason = "", "length"
    try:
        async for ev in gen.run(watch=False):
            if ev.text:
                text += ev.text
                yield event("response.output_text.delta", **where, delta=ev.text, logprobs=[])
            reason = ev.finish_reason or reason
    except Exception as e:  # the status line has gone: the stream carries the failure
        f = failure_of(e)
        response.status = "failed"
        response.error = {
            "code": "server_error" if f.status >= 500 else "invalid_request",
            "message": f.message,
        }
        yield event("response.failed", response=response.model_dump())
        return
    finish(response, message, gen, text, reason)
    part = message.content[0].model_dump()
    yield event("response.output_text.done", **where, text=text, logprobs=[])
    yield event("response.content_part.done", **where, part=part)
    yield event("response.output_item.done", output_index=0, item=message.model_dump())
    yield event("response.completed", response=response.model_dump())
