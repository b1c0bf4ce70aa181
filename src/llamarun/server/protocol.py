"""OpenAI wire types: request models, response and chunk types, error bodies, and the mapping
from a request to `SamplingParams` (vLLM's `to_sampling_params()` split). Unknown request fields
are ignored and logged once; fields we honour are validated here so a bad value becomes a 400.
The builders at the end make response parts from plain data (token counts, token ids with their
logprobs), so the routes only decide which parts to send when."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..engine import TopLogprobs
from ..errors import RequestError
from ..sampling import SamplingParams
from ..tokenizer import Tokenizer

log = logging.getLogger("llamarun.server")
_ignored_logged: set[str] = set()


class StreamOptions(BaseModel):
    include_usage: bool = False


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

    def log_ignored(self) -> None:
        for name in (self.model_extra or {}).keys() - _ignored_logged:
            _ignored_logged.add(name)
            log.warning("ignored request field: %s", name)

    def to_sampling_params(self, max_new_tokens: int, choice: int = 0) -> SamplingParams:
        """Sampling parameters of choice number `choice`; its seed is derived so choices differ."""
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
            )
        except RequestError as e:
            param = "max_tokens" if e.param == "max_new_tokens" else e.param
            raise RequestError(str(e).replace("max_new_tokens", "max_tokens"), param=param) from e


class ContentPart(BaseModel):
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def as_dict(self) -> dict[str, str]:
        role = "system" if self.role == "developer" else self.role  # OpenAI's newer name for it
        if isinstance(self.content, list):
            if any(p.type != "text" or p.text is None for p in self.content):
                raise RequestError(
                    "only text content parts are supported in messages", param="messages"
                )
            return {"role": role, "content": "".join(p.text for p in self.content)}
        return {"role": role, "content": self.content or ""}


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


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
    content: str


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


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


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


# ---- builders --------------------------------------------------------------------------------


def error_body(
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: int | str | None = None,
) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """A token's own text; a token holding part of a UTF-8 character shows U+FFFD."""
    return tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")


def chat_logprobs(
    tokenizer: Tokenizer, token_id: int | None, logprob: float | None, top: TopLogprobs
) -> ChoiceLogprobs | None:
    """The chat `logprobs` of one sampled token; None where there is no shown token to score."""
    if token_id is None or logprob is None:
        return None
    alternatives = [
        TopLogprob(token=token_text(tokenizer, t), logprob=lp, bytes=list(tokenizer.token_bytes(t)))
        for t, lp in top
    ]
    entry = TokenLogprob(
        token=token_text(tokenizer, token_id),
        logprob=logprob,
        bytes=list(tokenizer.token_bytes(token_id)),
        top_logprobs=alternatives,
    )
    return ChoiceLogprobs(content=[entry])


def completion_logprobs(
    tokenizer: Tokenizer, scores: list[tuple[int, float | None, TopLogprobs]], offset: int
) -> CompletionLogprobs:
    """The legacy completions `logprobs` of (token id, logprob, alternatives), the first token
    starting at character `offset` of the choice's text (a prompt's first token has no logprob)."""
    out = CompletionLogprobs()
    for token_id, lp, alts in scores:
        text = token_text(tokenizer, token_id)
        out.tokens.append(text)
        out.token_logprobs.append(lp)
        out.top_logprobs.append(
            {token_text(tokenizer, t): a for t, a in alts} if lp is not None else None
        )
        out.text_offset.append(offset)
        offset += len(text)
    return out


def chat_role_choices(indices: Iterable[int]) -> list[ChatChunkChoice]:
    """A chat stream's first chunk: each choice opens with the assistant role and no text."""
    return [
        ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content="")) for i in indices
    ]


def chat_text_choice(index: int, text: str, logprobs: ChoiceLogprobs | None) -> ChatChunkChoice:
    return ChatChunkChoice(index=index, delta=ChatDelta(content=text), logprobs=logprobs)


def chat_finish_choice(index: int, finish_reason: str) -> ChatChunkChoice:
    return ChatChunkChoice(index=index, delta=ChatDelta(), finish_reason=finish_reason)
