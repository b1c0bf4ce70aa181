"""OpenAI wire types: request models, response and chunk types, error bodies, and the mapping
from a request to `SamplingParams` (vLLM's `to_sampling_params()` split). Unknown request fields
are ignored and logged once; fields we honour are validated here so a bad value becomes a 400.
builders.py makes response parts of these types from plain data."""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from ..errors import RequestError
from ..sampling import SamplingParams

log = logging.getLogger("llamarun.server")
_ignored_logged: set[str] = set()


class StreamOptions(BaseModel):
    include_usage: bool = False


class JSONSchemaFormat(BaseModel):
    name: str | None = None
    description: str | None = None
    schema_: dict | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


# Request fields that constrain the output -> the SamplingParams field each one sets (OpenAI's
# response_format; vLLM's guided_*; llama.cpp's grammar and json_schema)
CONSTRAINTS = {
    "response_format": "json_schema",
    "guided_json": "json_schema",
    "json_schema": "json_schema",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
    "grammar": "grammar",
}


class SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: disabled (vLLM's convention)
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    grammar: str | None = None
    json_schema: dict | None = None

    def constraint(self) -> tuple[dict[str, Any], str | None]:
        """SamplingParams keywords of the request's output constraint, and the request field
        they come from (None when there is none)."""
        given = {name: getattr(self, name) for name in CONSTRAINTS}
        given = {name: value for name, value in given.items() if value is not None}
        if self.response_format is not None and self.response_format.type == "text":
            del given["response_format"]
        if len(given) > 1:
            first, second = list(given)[:2]
            raise RequestError(f"give {first} or {second}, not both", param=second)
        if not given:
            return {}, None
        ((source, value),) = given.items()
        if source == "response_format":
            value = self._response_schema()
        return {CONSTRAINTS[source]: value}, source

    def _response_schema(self) -> dict | bool:
        rf = self.response_format
        if rf.type == "json_object":
            return True
        if rf.json_schema is None:
            raise RequestError(
                "response_format of type json_schema needs a json_schema: "
                "{'name': ..., 'schema': {...}}",
                param="response_format",
            )
        schema = rf.json_schema.schema_
        return True if schema is None else schema

    def request_error(self, e: RequestError, source: str | None) -> RequestError:
        """`e` (about a SamplingParams field) reworded for this request's own field names."""
        if e.param == "max_new_tokens":
            return RequestError(str(e).replace("max_new_tokens", "max_tokens"), param="max_tokens")
        if source is not None and e.param in CONSTRAINTS.values():
            return RequestError(f"{source}: {e}", param=source)
        return e

    def log_ignored(self) -> None:
        for name in (self.model_extra or {}).keys() - _ignored_logged:
            _ignored_logged.add(name)
            log.warning("ignored request field: %s", name)

    def to_sampling_params(
        self,
        max_new_tokens: int,
        choice: int = 0,
        constraint: dict[str, Any] | None = None,
        source: str | None = None,
    ) -> SamplingParams:
        """Sampling parameters of choice number `choice`; its seed is derived so choices differ.
        constraint: SamplingParams keywords constraining the output, from the request field
        `source` (see `constraint`) or from its tools."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        try:
            return SamplingParams(
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=self.top_k if self.top_k and self.top_k > 0 else None,
                min_p=self.min_p or 0.0,
                presence_penalty=self.presence_penalty or 0.0,
                frequency_penalty=self.frequency_penalty or 0.0,
                max_new_tokens=max_new_tokens,
                stop=stop,
                seed=None if self.seed is None else self.seed + choice,
                **(constraint or {}),
            )
        except RequestError as e:
            raise self.request_error(e, source) from e


class ContentPart(BaseModel):
    type: str
    text: str | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # which call a tool message answers
    name: str | None = None

    def as_dict(self) -> dict[str, Any]:
        role = "system" if self.role == "developer" else self.role  # OpenAI's newer name for it
        content = self.content or ""
        if isinstance(self.content, list):
            if any(p.type != "text" or p.text is None for p in self.content):
                raise RequestError(
                    "only text content parts are supported in messages", param="messages"
                )
            content = "".join(p.text for p in self.content)
        message: dict[str, Any] = {"role": role, "content": content}
        if self.tool_calls:
            message["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        for key in ("tool_call_id", "name"):
            if getattr(self, key) is not None:
                message[key] = getattr(self, key)
        return message


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None  # checked by tools.tool_request, which names what is wrong
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


# ---- responses -------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # None when the answer is only tool calls
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class _WithoutNulls(BaseModel):
    """Serialized without its unset fields: the openai client joins delta.tool_calls by
    replacing `type` and appending strings, so a null would erase and an id repeat."""

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler) -> dict:
        return {k: v for k, v in handler(self).items() if v is not None}


class FunctionDelta(_WithoutNulls):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_WithoutNulls):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    """Both the whole response and each streamed chunk (OpenAI uses one shape for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llamarun"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
