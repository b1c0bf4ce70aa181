"""What a chat request offers: OpenAI's `tools`, `tool_choice` and `parallel_tool_calls`,
checked into a `ToolRequest`, and the calls and answers that come back."""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import guided
from ..errors import RequestError

TOOL_CHOICES = ("auto", "none", "required")


@dataclass(frozen=True)
class Tool:
    name: str
    description: str | None
    parameters: Mapping[str, Any]  # a JSON schema of type object

    def as_openai(self) -> dict:
        function = {"name": self.name, "parameters": dict(self.parameters)}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}


@dataclass
class ToolCall:
    """One call the model made: `arguments` is JSON text, as OpenAI's function.arguments."""

    name: str
    arguments: str
    id: str = ""

    def as_openai(self) -> dict:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }

    def arguments_object(self) -> dict:
        """The arguments as the object Anthropic's tool_use and ollama's tool_calls carry: {} for
        a call cut off by the token budget (its JSON never closed)."""
        try:
            parsed = json.loads(self.arguments)
        except json.JSONDecodeError:
            return {}
        return parsed if isinstance(parsed, dict) else {}


@dataclass
class ChatResponse:
    """LLM.chat's answer when tools were offered: text, calls, or both."""

    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str = "stop"  # "tool_calls" when the model called tools, else "stop"/"length"


@dataclass(frozen=True)
class ToolRequest:
    """What a request offers: its tools and how the model may use them. choice is "auto",
    "none", "required", or "function" with `name` the one function it must call."""

    tools: tuple[Tool, ...]
    choice: str = "auto"
    name: str | None = None
    parallel: bool = False  # several calls in one answer (parallel_tool_calls: true)

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    @property
    def forced(self) -> bool:
        """Calls are constrained from the first token (required or a named function)."""
        return self.choice in ("required", "function")

    @property
    def callable(self) -> tuple[Tool, ...]:
        return tuple(t for t in self.tools if self.name is None or t.name == self.name)


def tool_request(
    tools: Sequence[Mapping] | None, tool_choice: object = None, parallel: bool | None = None
) -> ToolRequest | None:
    """The checked ToolRequest of OpenAI's `tools`, `tool_choice` and `parallel_tool_calls`
    (None without tools); RequestError naming the parameter otherwise."""
    parsed = tuple(_tool(i, t) for i, t in enumerate(tools or ()))
    names = [t.name for t in parsed]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise RequestError(f"tools has two functions named {dup!r}", param="tools")
    choice, name = _tool_choice(tool_choice, names)
    if not parsed:
        if choice in ("required", "function"):
            raise RequestError(
                f"tool_choice is {tool_choice!r} but no tools were given", "tool_choice"
            )
        return None
    # One call per answer unless asked for more, as llama.cpp's server: a small model offered
    # a list keeps adding calls until its budget runs out mid-call.
    return ToolRequest(parsed, choice, name, bool(parallel) and choice != "function")


def _tool(i: int, raw: object) -> Tool:
    where = f"tools[{i}]"
    if not isinstance(raw, Mapping) or raw.get("type", "function") != "function":
        raise RequestError(f"{where} must be {{'type': 'function', 'function': {{...}}}}", where)
    function = raw.get("function")
    if not isinstance(function, Mapping):
        raise RequestError(f"{where}.function must be an object with a name", f"{where}.function")
    name = function.get("name")
    if not isinstance(name, str) or not name or len(name) > 64:
        raise RequestError(
            f"{where}.function.name must be a non-empty string of at most 64 characters",
            f"{where}.function.name",
        )
    parameters = function.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}  # OpenAI: a function without arguments
    if not isinstance(parameters, Mapping) or parameters.get("type", "object") != "object":
        raise RequestError(
            f"{where}.function.parameters must be a JSON schema of type 'object' (the function's "
            f"arguments), got {json.dumps(parameters)[:80]}",
            f"{where}.function.parameters",
        )
    try:  # an invalid schema is named here, not as the grammar built from it
        guided.check(guided.make_guide(json_schema=dict(parameters)))
    except RequestError as e:
        param = f"{where}.function.parameters"
        raise RequestError(f"{param}: {e}", param) from e
    description = function.get("description")
    return Tool(name, description if isinstance(description, str) else None, dict(parameters))


def _tool_choice(raw: object, names: list[str]) -> tuple[str, str | None]:
    if raw is None:
        return "auto", None
    if isinstance(raw, str):
        if raw not in TOOL_CHOICES:
            raise RequestError(
                f"tool_choice must be one of {', '.join(TOOL_CHOICES)} or "
                f"{{'type': 'function', 'function': {{'name': ...}}}}, got {raw!r}",
                "tool_choice",
            )
        return raw, None
    function = raw.get("function") if isinstance(raw, Mapping) else None
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(name, str):
        raise RequestError(
            "tool_choice must name a function as {'type': 'function', 'function': {'name': ...}}",
            "tool_choice",
        )
    if name not in names:
        known = ", ".join(repr(n) for n in names) or "none"
        raise RequestError(
            f"tool_choice names the function {name!r}, which is not among the tools ({known})",
            "tool_choice",
        )
    return "function", name


def finish_reason(reason: str, calls: Sequence[ToolCall]) -> str:
    """OpenAI's "tool_calls" for an answer that ended by itself with calls."""
    return "tool_calls" if calls and reason == "stop" else reason


def new_call_id(format_name: str) -> str:
    """OpenAI-style ids; Mistral's templates insist on 9 letters and digits."""
    if format_name == "mistral":
        alphabet = string.ascii_letters + string.digits
        return "".join(secrets.choice(alphabet) for _ in range(9))
    return f"call_{secrets.token_hex(12)}"
