"""Tools, tool results and earlier calls in the prompt.

A Jinja template that renders `tools` (tried once with a probe tool) gets them as transformers'
apply_chat_template(tools=...) passes them, with calls' arguments as objects, and its model
answers in the format its template names (formats.py). Any other chat format gets llama.cpp's
generic treatment: a system prompt listing the tools and the JSON to answer with, earlier calls
written as that JSON and tool results as user messages holding {"tool_response": ...}.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache

from ..tokenizer.chat import ChatFormat, JinjaChatFormat, Message
from .formats import HERMES_OPEN, MISTRAL_CALLS, PYTHON_TAG
from .request import ToolRequest

PROBE = {
    "type": "function",
    "function": {
        "name": "llamarun_probe_tool",
        "description": "probe",
        "parameters": {"type": "object", "properties": {}},
    },
}


def tool_format(chat_format: ChatFormat) -> str:
    """The format the model answers calls in: its template's own, else "generic"."""
    if isinstance(chat_format, JinjaChatFormat) and _renders_tools(chat_format):
        template = chat_format.template
        if HERMES_OPEN in template:
            return "hermes"
        if MISTRAL_CALLS in template:
            return "mistral"
        if PYTHON_TAG in template or "<|start_header_id|>" in template:
            return "llama3"
    return "generic"


def _renders_tools(chat_format: JinjaChatFormat) -> bool:
    return _template_renders_tools(chat_format.template, chat_format)


@lru_cache(maxsize=16)
def _template_renders_tools(template: str, chat_format: JinjaChatFormat) -> bool:
    probe = [{"role": "user", "content": "hi"}]
    try:
        text = chat_format.render(probe, tools=[PROBE])
    except Exception:  # a template that breaks on tools does not support them
        return False
    return PROBE["function"]["name"] in text


def encode_chat(
    chat_format: ChatFormat, messages: Sequence[Message], request: ToolRequest | None
) -> tuple[list[int], str]:
    """Prompt ids for `messages` offering the request's tools (none when tool_choice is
    "none"), and the tool format the answer will be read in."""
    name = tool_format(chat_format)
    offered = list(request.tools) if request is not None and request.active else []
    if name != "generic":
        tools = [t.as_openai() for t in offered] or None
        return chat_format.encode_dialog([_native(m) for m in messages], tools=tools), name
    return chat_format.encode_dialog(_generic(messages, offered, request)), name


def _native(m: Message) -> Message:
    """Calls' arguments as objects (what tool templates write with tojson), content never null."""
    m = dict(m)
    if m.get("tool_calls"):
        m["tool_calls"] = [_with_argument_object(c) for c in m["tool_calls"]]
    if m.get("content") is None:
        m["content"] = ""
    return m


def _with_argument_object(call: dict) -> dict:
    function = dict(call.get("function") or {})
    function["arguments"] = _arguments_object(function.get("arguments"))
    return {**call, "function": function}


def _arguments_object(arguments: object) -> object:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments if arguments is not None else {}


def _generic(messages: Sequence[Message], tools: list, request: ToolRequest | None) -> list:
    """Plain role/content messages for a format without tool support."""
    names = {}  # tool_call_id -> function name, to say whose result a tool message is
    out = []
    for m in messages:
        role, content = m.get("role"), m.get("content")
        if role == "assistant" and m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                function = call.get("function") or {}
                names[call.get("id")] = function.get("name")
                arguments = _arguments_object(function.get("arguments"))
                calls.append({"name": function.get("name"), "arguments": arguments})
                if call.get("id"):
                    calls[-1]["id"] = call["id"]
            answer = {"tool_calls": calls, **({"content": content} if content else {})}
            out.append({"role": "assistant", "content": json.dumps(answer, ensure_ascii=False)})
        elif role == "tool":
            result = {"tool": m.get("name") or names.get(m.get("tool_call_id")), "content": content}
            if m.get("tool_call_id"):
                result["tool_call_id"] = m["tool_call_id"]
            response = json.dumps({"tool_response": result}, ensure_ascii=False)
            out.append({"role": "user", "content": response})
        else:
            out.append({"role": role, "content": content or ""})
    if tools:
        prompt = generic_system_prompt(tools, request)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def generic_system_prompt(tools: list, request: ToolRequest) -> str:
    """What the generic format tells the model: the tools and the JSON it answers with."""
    listing = json.dumps([t.as_openai()["function"] for t in tools], indent=2, ensure_ascii=False)
    example_call = {"name": "tool_name", "arguments": {"arg1": "some_value"}}
    example = {"tool_calls": [example_call]} if request.parallel else {"tool_call": example_call}
    lines = [
        "You can call these tools to answer the user's request:",
        listing,
        "",
        "Answer with JSON only. To call a tool, write:",
        json.dumps(example),
    ]
    if not request.forced:
        lines += ["To answer the user directly, write:", json.dumps({"response": "your answer"})]
    return "\n".join(lines)
