"""Tool calling in chat: the request's tools and tool_choice (request.py), how a chat format
shows them to the model (render.py), the formats models answer in with their grammars and
readers (formats.py), and reading an answer into content and calls, whole or streamed as
OpenAI's deltas (stream.py).

`prepare_chat` is the one entry: messages (tool results and earlier calls included) and a
`ToolRequest` in; the prompt ids, the constraint for SamplingParams and the reader out."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import RequestError
from ..guided import Guide
from ..tokenizer import Tokenizer
from ..tokenizer.chat import ChatFormat, Message
from .formats import constraint
from .render import encode_chat
from .request import ChatResponse, Tool, ToolCall, ToolRequest, finish_reason, tool_request
from .stream import Delta, ToolReader, ToolStream

__all__ = [
    "ChatPlan",
    "ChatResponse",
    "Delta",
    "Tool",
    "ToolCall",
    "ToolReader",
    "ToolRequest",
    "ToolStream",
    "finish_reason",
    "prepare_chat",
    "tool_request",
]


@dataclass
class ChatPlan:
    prompt_ids: list[int]
    # SamplingParams keywords replacing the answer's own constraint (json_schema= or grammar=;
    # {}: none); None keeps the answer's own (no tools offered)
    constraint: dict | None
    reader: ToolReader | None  # None: the answer is plain text


def prepare_chat(
    chat_format: ChatFormat,
    tokenizer: Tokenizer,
    messages: Sequence[Message],
    request: ToolRequest | None,
    answer: Guide | None = None,
) -> ChatPlan:
    """answer: the constraint on a text answer (SamplingParams.guide, OpenAI's response_format):
    with tools offered only a JSON schema can stand beside the calls."""
    prompt_ids, format_name = encode_chat(chat_format, messages, request)
    if request is None or not request.active:
        return ChatPlan(prompt_ids, None, None)
    if answer is not None and answer.kind != "json_schema":
        raise RequestError(
            f"a {answer.kind} constraint cannot be combined with tools; a JSON schema can",
            param=answer.kind,
        )
    schema = json.loads(answer.text) if answer is not None else None
    rules = constraint(format_name, request, tokenizer, schema)
    return ChatPlan(prompt_ids, rules, ToolReader(format_name, constrained=bool(rules)))
