"""Structured outputs and tool calls through the OpenAI API, with the official `openai` client,
on the tiny random model of test_server.py: whatever it prefers, constrained answers follow the
request, and bad schemas, grammars and tool requests are 400s naming the parameter."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest
import torch
from test_server import API_KEY, MODEL, LineChatFormat, ServerThread, build_llm

from llamarun.server import create_app

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": -5, "maximum": 5},
        "pet": {"enum": ["cat", "dog"]},
    },
    "required": ["ok", "n", "pet"],
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["unit", "days"],
        },
    },
}


@pytest.fixture(scope="module")
def client():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as test_server.py: a tiny model gains nothing from threads
    llm = build_llm(max_seq_len=1024)  # room for the generic format's tool listing
    running = ServerThread(
        create_app(
            llm, model_name=MODEL, api_key=API_KEY, chat_format=LineChatFormat(llm.tokenizer)
        )
    )
    yield openai.OpenAI(base_url=running.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    running.stop()
    torch.set_num_threads(threads)


def chat(client, **kwargs):
    kwargs.setdefault("temperature", 0)
    kwargs.setdefault("max_tokens", 60)
    messages = [{"role": "user", "content": kwargs.pop("content", "Answer")}]
    return client.chat.completions.create(model=MODEL, messages=messages, **kwargs)


def test_response_format_json_schema_streaming_and_not(client):
    rf = {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True},
    }
    whole = chat(client, response_format=rf).choices[0]
    jsonschema.validate(json.loads(whole.message.content), SCHEMA)
    assert whole.finish_reason == "stop"
    chunks = list(chat(client, response_format=rf, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.message.content


def test_json_object_and_the_vllm_and_llama_cpp_extensions(client):
    def content(**body) -> str:
        return chat(client, extra_body=body).choices[0].message.content

    assert content(guided_choice=["left", "right"]) in ("left", "right")
    assert re.fullmatch(r"[a-f]{3}-[0-9]", content(guided_regex="[a-f]{3}-[0-9]"))
    assert content(grammar='root ::= "yes" | "no"') in ("yes", "no")
    assert content(guided_grammar='start: "id" /[0-9]{2}/').startswith("id")
    for key in ("guided_json", "json_schema"):
        jsonschema.validate(json.loads(content(**{key: SCHEMA})), SCHEMA)
    assert content(response_format={"type": "json_object"}).startswith("{")


def test_completions_take_response_format_too(client):
    rf = {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}
    out = client.completions.create(
        model=MODEL,
        prompt="Data:",
        max_tokens=60,
        temperature=1,
        seed=4,
        extra_body={"response_format": rf},
    )
    jsonschema.validate(json.loads(out.choices[0].text), SCHEMA)


def test_n_choices_each_follow_the_schema(client):
    out = chat(client, n=3, temperature=1, seed=7, extra_body={"guided_json": SCHEMA})
    for choice in out.choices:
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_forced_tool_calls_validate_streamed_and_not(client, choice):
    for seed in (0, 1):
        ask = dict(tools=[WEATHER], tool_choice=choice, temperature=1, seed=seed, max_tokens=150)
        whole = chat(client, **ask).choices[0]
        assert whole.finish_reason == "tool_calls" and whole.message.content is None
        (call,) = whole.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather" and call.id
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
        messages = [{"role": "user", "content": "Answer"}]
        with client.chat.completions.stream(model=MODEL, messages=messages, **ask) as stream:
            streamed = stream.get_final_completion().choices[0]
        assert streamed.finish_reason == "tool_calls"
        (joined,) = streamed.message.tool_calls
        assert (joined.function.name, joined.function.arguments) == (
            call.function.name,
            call.function.arguments,
        )


def test_tool_choice_none_answers_in_text(client):
    out = chat(client, tools=[WEATHER], tool_choice="none", max_tokens=8).choices[0]
    assert out.message.tool_calls is None and len(out.message.content) == 8


def error_of(call) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    assert info.value.status_code == 400 and info.value.body["type"] == "invalid_request_error"
    return info.value


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}},
         "response_format", "invalid JSON schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "string", "pattern": "[a-"}}}}}},
         "response_format", "invalid JSON schema"),
        ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
        ({"guided_regex": "(a"}, "guided_regex", "invalid regex"),
        ({"grammar": "root ::= undefined"}, "grammar", "invalid grammar"),
        ({"guided_choice": []}, "guided_choice", "non-empty list"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "not both"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_stock"}}},
         "tool_choice", "'get_stock'"),
        ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice", "auto, none, required"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
         "tools[0].function.parameters", "type 'object'"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "city"}}]},
         "tools[0].function.parameters", "type 'object'"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "frob"}}}}}]},
         "tools[0].function.parameters", "invalid JSON schema"),
        ({"tools": [WEATHER], "guided_regex": "a+"}, "guided_regex", "cannot be combined with tools"),
    ],
)  # fmt: skip
def test_bad_constraints_and_tools_are_400s_naming_the_parameter(client, body, param, words):
    for stream in (False, True):  # refused before any token, so a stream is refused too
        err = error_of(lambda stream=stream: chat(client, extra_body=body, stream=stream))
        assert err.body["param"] == param and words in err.body["message"], err.body
