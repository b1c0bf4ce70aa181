"""OpenAI's Responses API over real HTTP with the official `openai` client, on the tiny server
(tiny_server.py): input forms, instructions, the event stream and its helper, usage, errors."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from tiny_server import API_KEY, MODEL, LineChatFormat

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=30)


def ask(client, given="Hello", **kwargs):
    kwargs.setdefault("max_output_tokens", 8)
    kwargs.setdefault("temperature", 0)
    return client.responses.create(model=MODEL, input=given, **kwargs)


def prompt_len(server, messages: list[dict]) -> int:
    llm = server.app.state.server.llm
    return len(LineChatFormat(llm.tokenizer).encode_dialog(messages))


def test_create_answers_with_one_message_and_counts_tokens(server, client):
    out = ask(client, max_output_tokens=7)
    assert out.object == "response" and out.model == MODEL and out.id.startswith("resp_")
    assert [item.type for item in out.output] == ["message"]
    assert len(out.output_text) == 7 and out.output[0].content[0].type == "output_text"
    assert out.status == "incomplete" and out.incomplete_details.reason == "max_output_tokens"
    assert out.usage.input_tokens == prompt_len(server, [{"role": "user", "content": "Hello"}])
    assert out.usage.output_tokens == 7 and out.usage.total_tokens == out.usage.input_tokens + 7


def test_a_string_and_a_user_message_are_the_same_input(client):
    as_string = ask(client, "Hi there")
    as_items = ask(client, [{"role": "user", "content": "Hi there"}])
    as_parts = ask(
        client,
        [
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "Hi there"}],
            }
        ],
    )
    assert as_string.output_text == as_items.output_text == as_parts.output_text


def test_instructions_are_the_system_prompt(server, client):
    out = ask(client, "Hi", instructions="Be brief.")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert out.usage.input_tokens == prompt_len(server, messages)
    assert out.instructions == "Be brief."
    same = ask(
        client, [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
    assert same.output_text == out.output_text


def test_streaming_joins_to_the_non_streamed_answer(client):
    whole = ask(client, "Tell me a story", max_output_tokens=12)
    with client.responses.stream(
        model=MODEL, input="Tell me a story", max_output_tokens=12, temperature=0
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == whole.output_text == final.output_text
    assert final.usage.output_tokens == 12 and final.usage.input_tokens == whole.usage.input_tokens


def test_the_event_stream_is_the_responses_sequence(server):
    body = {"model": MODEL, "input": "hi", "max_output_tokens": 3, "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", server.url + "/v1/responses", json=body, headers=headers) as r:
        events = [
            json.loads(x.removeprefix("data: ")) for x in r.iter_lines() if x.startswith("data: ")
        ]
    kinds = [e["type"] for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == text


def test_usage_reports_the_cached_prefix(client):
    system = "s" * 70  # BOS + "system: " + 70 + "\n" + "user: " shared: 86 tokens
    first = ask(client, [{"role": "system", "content": system}, {"role": "user", "content": "one"}])
    second = ask(
        client, [{"role": "system", "content": system}, {"role": "user", "content": "two"}]
    )
    assert second.usage.input_tokens_details.cached_tokens == 64  # whole 32-token chunks
    again = ask(client, [{"role": "system", "content": system}, {"role": "user", "content": "one"}])
    assert again.output_text == first.output_text


def error_of(call) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    return info.value


def test_an_unknown_previous_response_id_is_a_clear_400(client):
    err = error_of(lambda: ask(client, previous_response_id="resp_123"))
    assert err.status_code == 400 and err.body["param"] == "previous_response_id"
    assert "resp_123" in err.body["message"] and "whole conversation" in err.body["message"]


def test_an_unknown_model_is_a_404(client):
    err = error_of(lambda: client.responses.create(model="gpt-9", input="x"))
    assert err.status_code == 404 and err.body["code"] == "model_not_found"


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": MODEL}, "input"),
        ({"model": MODEL, "input": 5}, "input"),
        ({"model": MODEL, "input": "x", "max_output_tokens": "many"}, "max_output_tokens"),
        ({"model": MODEL, "input": "x", "temperature": -1}, "temperature"),
        ({"model": MODEL, "input": []}, "input"),
        ({"model": MODEL, "input": [{"type": "reasoning", "summary": []}]}, "input.0"),
        (
            {"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_image"}]}]},
            "input.0.content",
        ),
    ],
)
def test_bad_requests_are_400_in_openais_shape(server, body, param):
    r = httpx.post(
        server.url + "/v1/responses", json=body, headers={"Authorization": f"Bearer {API_KEY}"}
    )
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"].startswith(param)


def test_a_prompt_past_the_context_is_a_400(client):
    err = error_of(lambda: ask(client, "y" * 200))
    assert err.status_code == 400 and "128" in err.body["message"]
    err = error_of(lambda: ask(client, "y" * 100, max_output_tokens=60))
    assert err.status_code == 400 and err.body["param"] == "max_output_tokens"


def test_a_wrong_key_is_a_401(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    err = error_of(lambda: bad.responses.create(model=MODEL, input="x"))
    assert err.status_code == 401 and err.body["code"] == "invalid_api_key"
