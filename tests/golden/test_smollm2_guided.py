"""Golden: structured outputs and tool calls from the real SmolLM2-135M-Instruct (Q4_1 GGUF,
ChatML template without tool support, so the generic tool format) through the server that
`llamarun serve` runs, with the official `openai` client: every answer parses and validates,
streamed or not, greedy or sampled with several seeds."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
from conftest import shared_model
from test_server import ServerThread

import llamarun
from llamarun.server import create_app

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SMOLLM2 = "smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_TOKENS = 160
SCHEMAS = {
    "nested objects": (
        "Describe a fictional person and their home address.",
        {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "address": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
                    "required": ["city", "country"],
                },
            },
            "required": ["name", "address"],
        },
    ),
    "arrays with min and max items": (
        "List some colors of the rainbow.",
        {
            "type": "object",
            "properties": {
                "colors": {
                    "type": "array",
                    "items": {"type": "string", "maxLength": 16},
                    "minItems": 2,
                    "maxItems": 4,
                }
            },
            "required": ["colors"],
        },
    ),
    "enums": (
        "Pick a t-shirt for me.",
        {
            "type": "object",
            "properties": {
                "size": {"enum": ["small", "medium", "large"]},
                "color": {"type": "string", "enum": ["red", "green", "blue"]},
            },
            "required": ["size", "color"],
        },
    ),
    "integers with bounds": (
        "How old is a typical dog, and how many legs does it have?",
        {
            "type": "object",
            "properties": {
                "age": {"type": "integer", "minimum": 0, "maximum": 30},
                "legs": {"type": "integer", "minimum": 0, "maximum": 8},
                "score": {"type": "integer", "exclusiveMinimum": -10, "exclusiveMaximum": 10},
            },
            "required": ["age", "legs", "score"],
        },
    ),
    "required and optional fields": (
        "Give me a contact card for a friend.",
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 40},
                "nickname": {"type": "string", "maxLength": 20},
                "email": {"type": "string", "maxLength": 40},
                "verified": {"type": "boolean"},
            },
            "required": ["name", "verified"],
        },
    ),
    "strings with a pattern": (
        "Invent a flight number and its date.",
        {
            "type": "object",
            "properties": {
                "flight": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3,4}$"},
                "date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"},
            },
            "required": ["flight", "date"],
        },
    ),
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The current time in a time zone",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string", "maxLength": 32}},
            "required": ["timezone"],
        },
    },
}
PARAMETERS = {"get_weather": WEATHER, "get_time": TIME}


@pytest.fixture(scope="module")
def client():
    llm = llamarun.load(shared_model(SMOLLM2), device="cpu", max_seq_len=2048, max_batch_size=4)
    running = ServerThread(create_app(llm, model_name="smollm2"))
    yield openai.OpenAI(base_url=running.url + "/v1", api_key="-", max_retries=0, timeout=300)
    running.stop()


def ask(client, content: str, **kwargs):
    kwargs.setdefault("max_tokens", MAX_TOKENS)
    messages = kwargs.pop("messages", [{"role": "user", "content": content}])
    return client.chat.completions.create(model="smollm2", messages=messages, **kwargs)


def streamed(client, content: str, **kwargs):
    """The completion the official client assembles from the stream."""
    messages = kwargs.pop("messages", [{"role": "user", "content": content}])
    kwargs.setdefault("max_tokens", MAX_TOKENS)
    with client.chat.completions.stream(model="smollm2", messages=messages, **kwargs) as stream:
        return stream.get_final_completion()


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_answer_parses_and_validates(client, name):
    prompt, schema = SCHEMAS[name]
    rf = {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": schema, "strict": True},
    }
    runs = [dict(temperature=0), dict(temperature=0, stream=True)]
    runs += [dict(temperature=1, seed=seed, stream=seed == 2) for seed in (0, 1, 2)]

    def run(sampling: dict):
        call = streamed if sampling.pop("stream", False) else ask
        return call(client, prompt, response_format=rf, **sampling).choices[0]

    with ThreadPoolExecutor(len(runs)) as pool:  # several constrained rows in one batch
        answers = list(pool.map(run, runs))
    for choice in answers:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)


@pytest.mark.slow  # an open object runs long; the tiny server's tests cover the mode itself
def test_json_object_mode_answers_an_object(client):
    for seed in (0, 1):
        out = ask(client, "Describe a cat in JSON.", temperature=1, seed=seed,
                  response_format={"type": "json_object"}, max_tokens=300)  # fmt: skip
        assert isinstance(json.loads(out.choices[0].message.content), dict)


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
@pytest.mark.parametrize(
    "seeds",  # each run prefills the generic tool prompt (271 tokens): two seeds more are slow
    [(0,), pytest.param((1, 2), marks=pytest.mark.slow)],
    ids=["greedy and seed 0", "seeds 1 and 2"],
)
def test_forced_tool_calls_always_validate(client, tool_choice, seeds):
    runs = [dict(temperature=1, seed=seed) for seed in seeds]
    runs += [dict(temperature=0)] if seeds == (0,) else []

    def run(sampling: dict):
        return ask(client, "What is the weather like in Paris?", tools=[WEATHER, TIME],
                   tool_choice=tool_choice, **sampling).choices[0]  # fmt: skip

    with ThreadPoolExecutor(len(runs)) as pool:
        answers = list(pool.map(run, runs))
    for choice in answers:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.id and call.type == "function"
        if isinstance(tool_choice, dict):
            assert call.function.name == "get_weather"
        parameters = PARAMETERS[call.function.name]["function"]["parameters"]
        jsonschema.validate(json.loads(call.function.arguments), parameters)


def test_auto_answers_a_question_that_needs_no_tool_in_text(client):
    out = ask(client, "What is the capital of France?", tools=[WEATHER], temperature=0)
    choice = out.choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason == "stop"
    assert "Paris" in choice.message.content


def test_streamed_tool_calls_reassemble_to_the_non_streamed_call(client):
    ask_weather = dict(tools=[WEATHER], tool_choice="required", temperature=0)
    (whole,) = (
        ask(client, "What is the weather in Tokyo?", **ask_weather).choices[0].message.tool_calls
    )
    joined = streamed(client, "What is the weather in Tokyo?", **ask_weather).choices[0]
    assert joined.finish_reason == "tool_calls"
    (call,) = joined.message.tool_calls
    assert (call.function.name, call.function.arguments) == (
        whole.function.name,
        whole.function.arguments,
    )
    assert call.function.parsed_arguments is None or call.function.parsed_arguments == json.loads(
        whole.function.arguments
    )


def test_a_tool_result_then_a_new_turn_renders_and_answers(client):
    question = {"role": "user", "content": "What is the weather in Paris?"}
    first = ask(client, "", messages=[question], tools=[WEATHER], tool_choice="required",
                temperature=0).choices[0].message  # fmt: skip
    (call,) = first.tool_calls
    history = [
        question,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "sunny"}'},
    ]
    answer = ask(client, "", messages=history, tools=[WEATHER], temperature=0).choices[0]
    assert answer.finish_reason in ("stop", "tool_calls")
    assert answer.message.content or answer.message.tool_calls
    history += [
        {"role": "assistant", "content": answer.message.content or ""},
        {"role": "user", "content": "Thanks! Should I take an umbrella?"},
    ]
    last = ask(client, "", messages=history, tools=[WEATHER], tool_choice="none", temperature=0)
    assert last.choices[0].message.content and last.choices[0].message.tool_calls is None
