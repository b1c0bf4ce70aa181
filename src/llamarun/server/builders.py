"""Response parts made from plain data (token counts, token ids with their logprobs, an answer's
tool-call deltas), as protocol.py's types, so the routes only decide which parts to send when."""

from __future__ import annotations

from collections.abc import Iterable

from .. import tools
from ..engine import TopLogprobs
from ..tokenizer import Tokenizer
from .protocol import (
    ChatChunkChoice,
    ChatDelta,
    ChoiceLogprobs,
    CompletionLogprobs,
    FunctionDelta,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    Usage,
)


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


def chat_tool_choice(index: int, delta: tools.Delta) -> ChatChunkChoice:
    """A streamed piece of a tool-calling answer: text, or part of call number delta.index."""
    if delta.index is None:
        return ChatChunkChoice(index=index, delta=ChatDelta(content=delta.content))
    call = ToolCallDelta(
        index=delta.index,
        id=delta.id,
        type="function" if delta.id else None,
        function=FunctionDelta(name=delta.name, arguments=delta.arguments),
    )
    return ChatChunkChoice(index=index, delta=ChatDelta(tool_calls=[call]))


def tool_calls(calls: list[tools.ToolCall]) -> list[ToolCall] | None:
    return [ToolCall(**c.as_openai()) for c in calls] or None


def chat_finish_choice(index: int, finish_reason: str) -> ChatChunkChoice:
    return ChatChunkChoice(index=index, delta=ChatDelta(), finish_reason=finish_reason)
