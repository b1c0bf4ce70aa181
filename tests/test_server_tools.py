"""Tool calls and JSON schemas through the Anthropic, Responses and ollama APIs, with their
official clients, on the tiny server (tiny_server.py) with room for the generic format's tool
listing: forced calls validate and stream as they answer whole, earlier calls and their results
render as the chat completions route renders them, and bad tool requests are each API's 400."""

from __future__ import annotations

import json

import anthropic
import jsonschema
import ollama
import openai
import pytest
from tiny_server import API_KEY, MODEL, LineChatFormat, tiny_server

from llamarun import tools

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

WEATHER = {
    "name": "get_weather",
    "description": "The weather to come",
    "parameters": {
        "type": "object",
        "properties": {
            "unit": {"enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["unit", "days"],
    },
}
OPENAI_TOOL = {"type": "function", "function": WEATHER}
CLAUDE_TOOL = {
    "name": "get_weather",
    "description": WEATHER["description"],
    "input_schema": WEATHER["parameters"],
}
RESPONSES_TOOL = {"type": "function", **WEATHER}
ASK = [{"role": "user", "content": "Weather?"}]
CALL_ID = "call_1"
# the same conversation as chat completions messages: a call, its result, a new question
HISTORY = [
    *ASK,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": CALL_ID,
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"unit": "celsius", "days": 2}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": CALL_ID, "content": "sunny"},
    {"role": "user", "content": "And then?"},
]


@pytest.fixture(scope="module")
def server():
    with tiny_server(max_seq_len=1024) as running:
        yield running


def prompt_len(server, messages: list[dict], choice: object = None) -> int:
    """Prompt tokens of `messages` offering WEATHER, as the chat completions route renders them."""
    tokenizer = server.app.state.server.llm.tokenizer
    request = tools.tool_request([OPENAI_TOOL], choice)
    return len(
        tools.prepare_chat(LineChatFormat(tokenizer), tokenizer, messages, request).prompt_ids
    )


# ---- Anthropic --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def claude(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=API_KEY, max_retries=0, timeout=60)


@pytest.mark.parametrize("choice", [{"type": "any"}, {"type": "tool", "name": "get_weather"}])
def test_anthropic_forced_tool_use_validates_streamed_and_not(server, claude, choice):
    ask = dict(model=MODEL, max_tokens=100, messages=ASK, tools=[CLAUDE_TOOL], tool_choice=choice)
    ask["extra_body"] = {"temperature": 0}
    out = claude.messages.create(**ask)
    assert out.stop_reason == "tool_use" and [b.type for b in out.content] == ["tool_use"]
    (call,) = out.content
    assert call.name == "get_weather" and call.id
    jsonschema.validate(call.input, WEATHER["parameters"])
    assert out.usage.input_tokens == prompt_len(server, ASK, "required")
    with claude.messages.stream(**ask) as stream:
        deltas = [e.delta.type for e in stream if e.type == "content_block_delta"]
        final = stream.get_final_message()
    assert set(deltas) == {"input_json_delta"} and final.stop_reason == "tool_use"
    assert [(b.name, b.input) for b in final.content] == [(call.name, call.input)]


def test_anthropic_tool_use_and_tool_result_blocks_are_the_conversation(server, claude):
    messages = [
        *ASK,
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": CALL_ID,
                    "name": "get_weather",
                    "input": {"unit": "celsius", "days": 2},
                }
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": CALL_ID, "content": "sunny"},
                {"type": "text", "text": "And then?"},
            ],
        },
    ]
    counted = claude.messages.count_tokens(model=MODEL, messages=messages, tools=[CLAUDE_TOOL])
    assert counted.input_tokens == prompt_len(server, HISTORY)
    choice = {"type": "none"}  # tools listed, an answer in text
    out = claude.messages.create(
        model=MODEL,
        max_tokens=5,
        messages=messages,
        tools=[CLAUDE_TOOL],
        tool_choice=choice,
        # greedy (the client has no sampling arguments of its own): the tiny model never picks
        # EOS, so the answer runs to max_tokens
        extra_body={"temperature": 0},
    )
    assert out.content[0].type == "text" and out.stop_reason == "max_tokens"


@pytest.mark.parametrize(
    "body, words",
    [
        ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "f", "input": {}}]}]},
         "cannot hold tool_use"),
        ({"tools": [CLAUDE_TOOL], "tool_choice": {"type": "tool", "name": "get_stock"}}, "'get_stock'"),
        ({"tools": [{"name": "f", "input_schema": {"type": "array"}}]}, "type 'object'"),
    ],
)  # fmt: skip
def test_anthropic_bad_tool_requests_are_its_400(claude, body, words):
    ask = {"model": MODEL, "max_tokens": 5, "messages": ASK, **body}
    with pytest.raises(anthropic.BadRequestError) as info:
        claude.messages.create(**ask)
    assert info.value.body["error"]["type"] == "invalid_request_error"
    assert words in info.value.body["error"]["message"]


# ---- Responses --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def test_responses_function_call_items_validate_streamed_and_not(server, oai):
    ask = dict(model=MODEL, input="Weather?", tools=[RESPONSES_TOOL], tool_choice="required")
    ask |= dict(temperature=0, max_output_tokens=100)
    out = oai.responses.create(**ask)
    (call,) = out.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    assert out.status == "completed" and out.usage.input_tokens == prompt_len(
        server, ASK, "required"
    )
    with oai.responses.stream(**ask) as stream:
        deltas = [e.delta for e in stream if e.type == "response.function_call_arguments.delta"]
        final = stream.get_final_response()
    (streamed,) = final.output
    assert "".join(deltas) == streamed.arguments == call.arguments


def test_responses_function_call_and_output_items_are_the_conversation(server, oai):
    items = [
        *ASK,
        {"type": "function_call", "call_id": CALL_ID, "name": "get_weather", "arguments": '{"unit": "celsius", "days": 2}'},
        {"type": "function_call_output", "call_id": CALL_ID, "output": "sunny"},
        {"role": "user", "content": "And then?"},
    ]  # fmt: skip
    out = oai.responses.create(
        model=MODEL,
        input=items,
        tools=[RESPONSES_TOOL],
        tool_choice="none",
        max_output_tokens=5,
        temperature=0,  # greedy: the tiny model never picks EOS, so the answer is cut ("incomplete")
    )
    assert out.usage.input_tokens == prompt_len(server, HISTORY, "none")  # no tools listed
    assert [o.type for o in out.output] == ["message"] and out.status == "incomplete"


def test_responses_text_format_json_schema_streamed_and_not(oai):
    fmt = {"type": "json_schema", "name": "weather", "schema": WEATHER["parameters"]}
    ask = dict(model=MODEL, input="Weather?", text={"format": fmt}, temperature=0)
    out = oai.responses.create(**ask, max_output_tokens=60)
    jsonschema.validate(json.loads(out.output_text), WEATHER["parameters"])
    with oai.responses.stream(**ask, max_output_tokens=60) as stream:
        assert stream.get_final_response().output_text == out.output_text


@pytest.mark.parametrize(
    "body, param",
    [
        ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
        ({"tools": [RESPONSES_TOOL], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
        ({"text": {"format": {"type": "json_schema", "name": "a", "schema": {"type": "frob"}}}}, "text.format"),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, "input.0.call_id"),
    ],
)  # fmt: skip
def test_responses_bad_tool_requests_are_400s_naming_the_parameter(oai, body, param):
    with pytest.raises(openai.BadRequestError) as info:
        oai.responses.create(**{"model": MODEL, "input": "Hi", **body})
    assert info.value.body["param"] == param


# ---- ollama -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(server) -> ollama.Client:
    return ollama.Client(host=server.url, headers={"Authorization": f"Bearer {API_KEY}"})


def test_ollama_tool_calls_validate_streamed_and_not(llama):
    # ollama has no tool_choice: the generic format lets the model call or answer in text, so
    # seeds are tried until one calls (each seed's answer is fixed)
    ask = dict(model=MODEL, messages=ASK, tools=[OPENAI_TOOL])
    for seed in range(12):
        options = {"temperature": 1, "seed": seed, "num_predict": 100}
        out = llama.chat(**ask, options=options)
        if out.message.tool_calls:
            break
    else:
        pytest.fail("no seed of 12 called the tool")
    (call,) = out.message.tool_calls
    assert call.function.name == "get_weather" and out.done_reason == "stop"
    jsonschema.validate(dict(call.function.arguments), WEATHER["parameters"])
    parts = list(llama.chat(**ask, options=options, stream=True))
    assert [c for p in parts for c in p.message.tool_calls or ()] == [call]


def test_ollama_tool_calls_and_tool_messages_are_the_conversation(server, llama):
    call = {"function": {"name": "get_weather", "arguments": {"unit": "celsius", "days": 2}}}
    messages = [
        *ASK,
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
        {"role": "user", "content": "And then?"},
    ]
    out = llama.chat(model=MODEL, messages=messages, options={"num_predict": 1})
    expected = [
        *ASK,
        {**HISTORY[1], "tool_calls": [{**HISTORY[1]["tool_calls"][0], "id": "call_1_0"}]},
        {"role": "tool", "name": "get_weather", "content": "sunny"},
        HISTORY[3],
    ]
    tokenizer = server.app.state.server.llm.tokenizer
    rendered = tools.prepare_chat(LineChatFormat(tokenizer), tokenizer, expected, None).prompt_ids
    assert out.prompt_eval_count == len(rendered)


def test_ollama_format_json_schema_and_json(llama):
    options = {"temperature": 0, "num_predict": 60}
    out = llama.generate(
        model=MODEL, prompt="Weather?", format=WEATHER["parameters"], options=options
    )
    jsonschema.validate(json.loads(out.response), WEATHER["parameters"])
    chat = llama.chat(model=MODEL, messages=ASK, format="json", options=options)
    assert chat.message.content.startswith("{")
    with pytest.raises(ollama.ResponseError) as info:
        llama.chat(model=MODEL, messages=ASK, format={"type": "frob"})
    assert info.value.status_code == 400 and "format" in info.value.error
