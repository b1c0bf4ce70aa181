"""Tool calling in chat: the request's tools and tool_choice (request.py), how a chat format
shows them to the model (render.py), the formats models answer in with their grammars and
readers (formats.py), and reading an answer into content and calls, whole or streamed as
OpenAI's deltas (stream.py).

`prepare_chat` is the one entry: messages (tool results and earlier calls included) and a
`ToolRequest` in; the prompt ids, the constraint for SamplingParams and the reader out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..tokenizer import Tokenizer
from ..tokenizer.chat import ChatFormat, Message
from .formats import constraint
from .render import encode_chat
from .request import ChatResponse, Tool, ToolCall, ToolRequest, tool_request
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
    "prepare_chat",
    "tool_request",
]


@dataclass
class ChatPlan:
    prompt_ids: list[int]
    constraint: dict  # SamplingParams keywords (json_schema= or grammar=); {} leaves it free
    reader: ToolReader | None  # None: the answer is plain text


def prepare_chat(
    chat_format: ChatFormat,
    tokenizer: Tokenizer,
    messages: Sequence[Message],
    request: ToolRequest | None,
    response_schema: dict | None = None,
) -> ChatPlan:
    """response_schema: the JSON schema a text answer must follow besides the calls (OpenAI's
    response_format with tools), or None."""
    prompt_ids, format_name = encode_chat(chat_format, messages, request)
    if request is None or not request.active:
        return ChatPlan(prompt_ids, {}, None)
    rules = constraint(format_name, request, tokenizer, response_schema)
    return ChatPlan(prompt_ids, rules, ToolReader(format_name, constrained=bool(rules)))
