"""The formats models write tool calls in: a reader per format that finds the calls in the
answer's text (complete or still streaming), and the constraint that makes a forced call valid.

- hermes: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, repeated (Hermes 2
  Pro, Qwen 2.5/3 templates); text may come before.
- llama3: `{"name": ..., "parameters": {...}}` (Llama 3.1/3.2 JSON tool calling), after an
  optional <|python_tag|>, several separated by ";".
- mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`.
- generic: the whole answer is JSON: {"tool_calls": [...]} or {"tool_call": {...}}, or
  {"response": "text"} (llama.cpp's generic format, for templates without tools).
Special tokens (<|python_tag|>, [TOOL_CALLS] in Mistral's vocabulary) are not text, so a reader
also accepts the calls without them. Grammars are llguidance Lark (`%json` inlines a schema).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from ..guided.llg import JSON_OPTIONS, closed
from ..tokenizer import Tokenizer
from .jsonscan import Malformed, Member, members, skip_ws, string_prefix
from .request import Tool, ToolRequest

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG, MISTRAL_CALLS = "<|python_tag|>", "[TOOL_CALLS]"


@dataclass
class PartialCall:
    name: str | None  # None until the name's string is complete
    arguments: str  # the arguments' JSON text so far
    done: bool  # the call's object is complete


@dataclass
class Reading:
    content: str  # text for the user so far (a possible start of a call held back)
    calls: list[PartialCall] = field(default_factory=list)
    in_call: bool = False  # a call has begun: the rest is not plain text


def read_call(text: str, i: int) -> tuple[PartialCall, int | None]:
    found, end = members(text, i)
    name = found.get("name")
    name_text = json.loads(text[name.start : name.end]) if name and name.end else None
    if name_text is not None and not isinstance(name_text, str):
        raise Malformed("a call's name must be a string")
    args = found.get("arguments") or found.get("parameters")
    raw = text[args.start : args.end if args.end is not None else len(text)] if args else ""
    if args is None and end is not None:
        raw = "{}"
    return PartialCall(name_text, raw, end is not None), end


def _held(text: str, final: bool, *markers: str) -> str:
    """`text` without a tail that may be the beginning of a marker (unless the text is final)."""
    if final:
        return text
    keep = max(
        (k for m in markers for k in range(1, len(m)) if text.endswith(m[:k])),
        default=0,
    )
    return text[: len(text) - keep]


def read_hermes(text: str, final: bool = False) -> Reading:
    reading, i = Reading(""), 0

    def add(piece: str) -> None:  # the newlines between calls are no text for the user
        if not reading.calls or piece.strip():
            reading.content += piece

    while True:
        j = text.find(HERMES_OPEN, i)
        if j < 0:
            add(_held(text[i:], final, HERMES_OPEN))
            return reading
        add(text[i:j])
        reading.in_call = True
        k = skip_ws(text, j + len(HERMES_OPEN))
        if k >= len(text):
            return reading
        call, end = read_call(text, k)
        reading.calls.append(call)
        if end is None:
            return reading
        k = skip_ws(text, end)
        if text.startswith(HERMES_CLOSE, k):
            i = k + len(HERMES_CLOSE)
        elif HERMES_CLOSE.startswith(text[k:]):
            return reading  # the closing tag is on its way, or the answer ended without it
        else:
            raise Malformed("expected </tool_call> after a call")


def _read_calls(text: str, i: int, reading: Reading, separators: str) -> Reading:
    """Call objects from text[i] on, separated by any of `separators` and whitespace."""
    reading.in_call = True
    while i < len(text):
        if text[i] != "{":
            raise Malformed("expected a call object")
        call, end = read_call(text, i)
        reading.calls.append(call)
        if end is None:
            return reading
        i = skip_ws(text, end)
        if i < len(text) and text[i] in separators:
            i = skip_ws(text, i + 1)
    return reading


def read_llama3(text: str, final: bool = False) -> Reading:
    i = skip_ws(text, 0)
    if text.startswith(PYTHON_TAG, i):
        i = skip_ws(text, i + len(PYTHON_TAG))
    elif i == len(text) or not text.startswith("{", i):
        return Reading(_held(text, final, PYTHON_TAG))
    return _read_calls(text, i, Reading(""), ";")


def read_mistral(text: str, final: bool = False) -> Reading:
    j = text.find(MISTRAL_CALLS)
    if j >= 0:
        reading, i = Reading(text[:j]), skip_ws(text, j + len(MISTRAL_CALLS))
    else:
        i = skip_ws(text, 0)
        if not text.startswith("[", i):  # the marker is a special token, so it may not show
            return Reading(_held(text, final, MISTRAL_CALLS))
        reading = Reading("")
    reading.in_call = True
    if i >= len(text):
        return reading
    if text[i] == "{":
        return _read_calls(text, i, reading, "")
    if text[i] != "[":
        raise Malformed("expected a list of calls after [TOOL_CALLS]")
    return _read_calls(text, skip_ws(text, i + 1), reading, ",]")


def read_generic(text: str, final: bool = False) -> Reading:
    i = skip_ws(text, 0)
    if i >= len(text):
        return Reading("")
    found, _ = members(text, i)
    if "tool_calls" in found:
        return _read_list(text, found["tool_calls"])
    if "tool_call" in found:
        value = found["tool_call"]
        end = value.end if value.end is not None else len(text)
        return _read_calls(text[:end], value.start, Reading(""), "")
    if "response" in found:
        value = found["response"]
        if text.startswith('"', value.start):
            return Reading(string_prefix(text, value))
        end = value.end if value.end is not None else len(text)
        return Reading(text[value.start : end])  # a response schema's JSON, as it is
    if found:
        raise Malformed("expected tool_call, tool_calls or response")
    return Reading("")


def _read_list(text: str, value: Member) -> Reading:
    i = value.start
    if i >= len(text):
        return Reading("", in_call=True)
    if text[i] != "[":
        raise Malformed("tool_calls must be a list")
    end = value.end if value.end is not None else len(text)
    return _read_calls(text[:end], skip_ws(text, i + 1), Reading(""), ",]")


READERS: dict[str, Callable[[str, bool], Reading]] = {  # (text, final) -> Reading
    "hermes": read_hermes,
    "llama3": read_llama3,
    "mistral": read_mistral,
    "generic": read_generic,
}


def call_schema(tool: Tool, arguments_key: str = "arguments") -> dict:
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, arguments_key: closed(dict(tool.parameters))},
        "required": ["name", arguments_key],
        "additionalProperties": False,
    }


def one_of(schemas: list[dict]) -> dict:
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


def constraint(
    format_name: str,
    request: ToolRequest,
    tokenizer: Tokenizer,
    response_schema: dict | None = None,
) -> dict:
    """SamplingParams keywords that constrain the answer: a forced call for required/named
    choices, and for the generic format also `auto` (a call, or {"response": ...} holding the
    response_schema's JSON when given). {} leaves an auto answer free."""
    tools = list(request.callable)
    if format_name == "generic":
        calls = [call_schema(t) for t in tools]
        if request.parallel:
            body = {"tool_calls": {"type": "array", "items": one_of(calls), "minItems": 1}}
        else:
            body = {"tool_call": one_of(calls)}
        schema = {"type": "object", "properties": body, "required": list(body)}
        if not request.forced:
            response = {"response": response_schema or {"type": "string"}}
            text = {"type": "object", "properties": response, "required": ["response"]}
            schema = {"anyOf": [schema, text]}
        return {"json_schema": {**schema, "x-guidance": JSON_OPTIONS}}
    if not request.forced:
        if response_schema is None:
            return {}
        answer = json.dumps({**closed(response_schema), "x-guidance": JSON_OPTIONS})
        start = f"start: calls | answer\nanswer: %json {answer}\n"
    else:
        start = "start: calls\n"
    return {"grammar": start + _call_rules(format_name, request, tokenizer, tools)}


def _call_rules(
    format_name: str, request: ToolRequest, tokenizer: Tokenizer, tools: list[Tool]
) -> str:
    """Lark rules for `calls`: one call, or with parallel calls one or more."""
    key = "parameters" if format_name == "llama3" else "arguments"
    schema = one_of([call_schema(t, key) for t in tools])
    many = request.parallel
    if format_name == "mistral":
        items = {"type": "array", "items": schema, "minItems": 1, "x-guidance": JSON_OPTIONS}
        if not many:
            items["maxItems"] = 1
        marker = _token_or_text(tokenizer, MISTRAL_CALLS)
        return f"calls: {marker} body\nbody: %json {json.dumps(items)}\n"
    schema = {**schema, "x-guidance": JSON_OPTIONS}
    if format_name == "hermes":
        separator, call = '"\\n"', f'call: "{HERMES_OPEN}\\n" body "\\n{HERMES_CLOSE}"\n'
    else:  # llama3
        separator, call = '"; "', "call: body\n"
    calls = f"calls: call ({separator} call)*\n" if many else "calls: call\n"
    return calls + call + f"body: %json {json.dumps(schema)}\n"


def _token_or_text(tokenizer: Tokenizer, piece: str) -> str:
    """A grammar item for `piece`: its special token (`<[id]>`) when it has one, else the text."""
    token_id = tokenizer.token_to_id(piece)
    if token_id is not None and not tokenizer.token_bytes(token_id):
        return f"<[{token_id}]>"
    return json.dumps(piece)
