"""OpenAI's Responses API: POST /v1/responses, answered as one Response object or, with
stream=true, as its event stream (response.created, response.in_progress, output_item.added,
content_part.added, output_text.delta..., output_text.done, content_part.done,
output_item.done, response.completed). One `Generation` on the shared scheduler per request.

Stateless: nothing is stored (store is accepted and has no effect), so a previous_response_id is
a 400 asking for the whole conversation as input. An answer cut by max_output_tokens has status
"incomplete" with incomplete_details, as OpenAI's; its stream still ends with response.completed,
whose response says so, so the client's stream helper (get_final_response) has its answer.

Function tools (`tools` of type function, `tool_choice`, `parallel_tool_calls`) go through the
chat completions route's tool calling (llamarun.tools): the answer's calls are function_call
output items (streamed as response.function_call_arguments.delta events), and function_call and
function_call_output input items are the earlier calls and their results. text.format takes a
JSON schema (json_schema) or any JSON object (json_object), as response_format does."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.sse import EventSourceResponse, format_sse_event
from pydantic import BaseModel, ConfigDict, Field

from .. import tools
from ..errors import RequestError
from ..sampling import SamplingParams
from .http_errors import APIError, error_route, failure_of, openai_error
from .jobs import Generation, chat_plan, token_budget
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
    """A message (the easy form without `type`, or type "message"), an earlier function_call
    (call_id, name, arguments) or its function_call_output (call_id, output); other item types
    are refused by name in `dialog_of`."""

    model_config = ConfigDict(extra="allow")
    type: str = "message"
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | list[ContentPart] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[ContentPart] | None = None


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_schema", "json_object"] = "text"
    schema_: dict[str, Any] | None = Field(None, alias="schema")

    def constraint(self) -> dict:
        """SamplingParams keywords for this format."""
        if self.type == "json_schema":
            if self.schema_ is None:
                raise RequestError(
                    "text.format of type json_schema needs its schema", "text.format"
                )
            return {"json_schema": self.schema_}
        return {"json_schema": True} if self.type == "json_object" else {}


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
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None

    def to_sampling_params(self, max_new_tokens: int) -> SamplingParams:
        fmt = self.text.format if self.text is not None else None
        try:
            return SamplingParams(
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                max_new_tokens=max_new_tokens,
                **(fmt.constraint() if fmt is not None else {}),
            )
        except RequestError as e:  # a schema that is not one
            raise RequestError(f"text.format: {e}", param="text.format") from e

    def tool_request(self) -> tools.ToolRequest | None:
        """Function tools (flat: name, description, parameters) and tool_choice as the chat
        completions route's ToolRequest."""
        offered = []
        for i, t in enumerate(self.tools or ()):
            if t.get("type") != "function":
                raise RequestError(
                    f"tools[{i}] is of type {t.get('type')!r}: this server runs function tools only",
                    param=f"tools.{i}.type",
                )
            function = {k: t[k] for k in ("name", "description", "parameters") if k in t}
            offered.append({"type": "function", "function": function})
        choice = self.tool_choice
        if isinstance(choice, dict) and choice.get("type") == "function":
            choice = {"type": "function", "function": {"name": choice.get("name")}}
        return tools.tool_request(offered, choice, self.parallel_tool_calls)


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


class FunctionCall(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str = ""
    status: Literal["in_progress", "completed", "incomplete"] = "in_progress"


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
    output: list[OutputMessage | FunctionCall] = []
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    parallel_tool_calls: bool = False
    tool_choice: str | dict = "auto"
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
    check(state, body)
    offered = body.tool_request()
    dialog = [{"role": "system", "content": body.instructions}] if body.instructions else []
    dialog += dialog_of(body.input)
    plan = chat_plan(state, dialog, offered, body.to_sampling_params(1))
    prompt_ids = plan.prompt_ids
    budget = token_budget(state.llm, prompt_ids, body.max_output_tokens, "max_output_tokens")
    params = plan.sampling(body.to_sampling_params(budget))
    gen = Generation.start(state, request, prompt_ids, params, chat=True, reader=plan.reader)
    response = Response(
        id=f"resp_{secrets.token_hex(12)}",
        created_at=int(time.time()),
        model=state.model_name,
        instructions=body.instructions,
        max_output_tokens=body.max_output_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        parallel_tool_calls=bool(offered and offered.parallel),
        tool_choice=body.tool_choice or "auto",
        tools=body.tools or [],
        text={"format": body.text.format.model_dump(by_alias=True, exclude_none=True)}
        if body.text is not None and body.text.format is not None
        else {"format": {"type": "text"}},
        metadata=body.metadata or {},
    )
    if body.stream:
        return EventSourceResponse(stream_events(gen, response))
    text, reason = "", "length"
    async for ev in gen.run(watch=True):
        text += ev.text
        reason = ev.finish_reason or reason
    content, calls, reason = gen.answer(text, reason)
    return finish(response, gen, output_of(content, calls, reason), reason)


def check(state: ServerState, body: ResponsesRequest) -> None:
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
    if state.no_chat is not None:
        raise RequestError(state.no_chat, param="input")


def dialog_of(given: str | list[InputItem]) -> list[dict]:
    """`input` as chat messages: a string is one user message; items are messages, function
    calls (joined to the assistant message before them) and their outputs (tool messages)."""
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    if not given:
        raise RequestError("input is an empty list: give a string or messages", param="input")
    dialog: list[dict] = []
    for i, item in enumerate(given):
        if item.type == "function_call":
            call = {
                "id": need(item.call_id, i, "call_id"),
                "type": "function",
                "function": {
                    "name": need(item.name, i, "name"),
                    "arguments": item.arguments or "{}",
                },
            }
            if not dialog or dialog[-1]["role"] != "assistant":
                dialog.append({"role": "assistant", "content": None})
            dialog[-1].setdefault("tool_calls", []).append(call)
        elif item.type == "function_call_output":
            output = item.output if isinstance(item.output, str) else text_of(item.output, i)
            dialog.append(
                {
                    "role": "tool",
                    "tool_call_id": need(item.call_id, i, "call_id"),
                    "content": output,
                }
            )
        elif item.type == "message" and item.role is not None:
            content = item.content if isinstance(item.content, str) else text_of(item.content, i)
            dialog.append({"role": ROLES.get(item.role, item.role), "content": content})
        else:
            raise RequestError(
                f"input[{i}] is a {item.type!r} item: this server takes messages with a role, "
                "function_call and function_call_output items",
                param=f"input.{i}",
            )
    return dialog


def need(value: str | None, i: int, field: str) -> str:
    if not value:
        raise RequestError(f"input[{i}] needs its {field}", param=f"input.{i}.{field}")
    return value


def text_of(parts: list[ContentPart] | None, i: int) -> str:
    parts = parts or []
    if any(p.type not in ("input_text", "output_text") or p.text is None for p in parts):
        raise RequestError(
            f"input[{i}].content: only input_text and output_text parts are supported",
            param=f"input.{i}.content",
        )
    return "".join(p.text for p in parts)


def output_of(
    content: str | None, calls: list[tools.ToolCall], reason: str
) -> list[OutputMessage | FunctionCall]:
    """The output items of a finished answer: its message (when it has text, or nothing else),
    then a function_call item per call."""
    status = "incomplete" if reason == "length" else "completed"
    items: list[OutputMessage | FunctionCall] = []
    if content or not calls:
        items.append(new_message(content or "", status))
    items += [new_call(call, status) for call in calls]
    return items


def new_message(text: str = "", status: str = "in_progress") -> OutputMessage:
    content = [OutputText(text=text)]
    return OutputMessage(id=f"msg_{secrets.token_hex(12)}", status=status, content=content)


def new_call(call: tools.ToolCall, status: str = "in_progress") -> FunctionCall:
    return FunctionCall(
        id=f"fc_{secrets.token_hex(12)}",
        call_id=call.id,
        name=call.name,
        arguments=call.arguments,
        status=status,
    )


def finish(
    response: Response,
    gen: Generation,
    output: list[OutputMessage | FunctionCall],
    reason: str,
) -> Response:
    """The finished response: its output items, status and usage."""
    cut = reason == "length"
    response.status = "incomplete" if cut else "completed"
    if cut:
        response.incomplete_details = {"reason": "max_output_tokens"}
    response.output = output
    response.usage = Usage(
        input_tokens=gen.prompt_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=gen.cached_tokens),
        output_tokens=gen.completion_tokens,
        total_tokens=gen.prompt_tokens + gen.completion_tokens,
    )
    return response


async def stream_events(gen: Generation, response: Response) -> AsyncIterator[bytes]:
    """response.created and .in_progress; per output item (the message, each function call)
    its output_item.added, deltas and done events, in turn; then response.completed (or
    response.failed)."""
    counter = iter(range(1 << 62))

    def event(kind: str, **fields) -> bytes:
        data = {"type": kind, "sequence_number": next(counter), **fields}
        return format_sse_event(event=kind, data_str=json.dumps(data))

    yield event("response.created", response=response.model_dump())
    yield event("response.in_progress", response=response.model_dump())
    items = OutputItems(event)
    reason = "length"
    try:
        async for deltas, finished in gen.deltas():
            for d in deltas:
                for e in items.add(d):
                    yield e
            reason = finished or reason
    except Exception as e:  # the status line has gone: the stream carries the failure
        f = failure_of(e)
        response.status = "failed"
        response.error = {
            "code": "server_error" if f.status >= 500 else "invalid_request",
            "message": f.message,
        }
        yield event("response.failed", response=response.model_dump())
        return
    content, calls = gen.streamed
    done, output = items.finish(content, calls, reason)
    for e in done:
        yield e
    yield event("response.completed", response=finish(response, gen, output, reason).model_dump())


class OutputItems:
    """A streamed answer's output items: a text delta extends the open message (or opens one),
    a call's first delta opens a function_call item, its argument fragments extend it."""

    def __init__(self, event):
        self.event = event
        self.opened: list[OutputMessage | FunctionCall] = []

    def add(self, d: tools.Delta) -> list[bytes]:
        out = []
        if d.content:
            if not self.opened or self.opened[-1].type != "message":
                out += self.open(new_message())
            out.append(self.text_event("response.output_text.delta", delta=d.content))
        elif d.id is not None:
            out += self.open(new_call(tools.ToolCall(d.name, "", d.id)))
        if d.arguments:
            where = {"item_id": self.opened[-1].id, "output_index": len(self.opened) - 1}
            out.append(
                self.event("response.function_call_arguments.delta", **where, delta=d.arguments)
            )
        return out

    def open(self, item: OutputMessage | FunctionCall) -> list[bytes]:
        self.opened.append(item)
        added = item.model_dump() | ({"content": []} if item.type == "message" else {})
        out = [
            self.event("response.output_item.added", output_index=len(self.opened) - 1, item=added)
        ]
        if item.type == "message":
            part = OutputText().model_dump()
            out.append(self.text_event("response.content_part.added", part=part))
        return out

    def text_event(self, kind: str, **fields) -> bytes:
        where = {"item_id": self.opened[-1].id, "output_index": len(self.opened) - 1}
        return self.event(kind, **where, content_index=0, **fields)

    def finish(
        self, content: str | None, calls: list[tools.ToolCall], reason: str
    ) -> tuple[list[bytes], list[OutputMessage | FunctionCall]]:
        """The done events of every item and the final output: the items streamed, in their
        final form (a call found by its id), and whatever the deltas did not open (an answer
        with no text still has its message)."""
        status = "incomplete" if reason == "length" else "completed"
        by_id = {call.id: call for call in calls}
        output: list[OutputMessage | FunctionCall] = []
        for item in self.opened:
            if item.type == "message":
                output.append(
                    item.model_copy(
                        update={"status": status, "content": [OutputText(text=content or "")]}
                    )
                )
            elif item.call_id in by_id:
                call = by_id.pop(item.call_id)
                output.append(
                    item.model_copy(update={"status": status, "arguments": call.arguments})
                )
        events = []
        if not output:
            events += self.open(new_message())
            output.append(self.opened[-1].model_copy(update={"status": status}))
        for call in by_id.values():
            events += self.open(new_call(call))
            output.append(self.opened[-1].model_copy(update={"status": status}))
        for i, item in enumerate(output):
            where = {"item_id": item.id, "output_index": i}
            if item.type == "message":
                text = item.content[0].text
                events.append(
                    self.event(
                        "response.output_text.done",
                        **where,
                        content_index=0,
                        text=text,
                        logprobs=[],
                    )
                )
                part = item.content[0].model_dump()
                events.append(
                    self.event("response.content_part.done", **where, content_index=0, part=part)
                )
            else:
                events.append(
                    self.event(
                        "response.function_call_arguments.done",
                        **where,
                        name=item.name,
                        arguments=item.arguments,
                    )
                )
            events.append(
                self.event("response.output_item.done", output_index=i, item=item.model_dump())
            )
        return events, output
