"""Anthropic's Messages API over real HTTP with the official `anthropic` client, on the tiny
server (tiny_server.py): answers, streaming, stop sequences, token counts, Anthropic's errors."""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest
from tiny_server import API_KEY, MODEL, LineChatFormat

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def client(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=API_KEY, max_retries=0, timeout=30)


GREEDY = {"temperature": 0}  # the client has no sampling arguments of its own any more


def ask(client, text: str = "Hello", **kwargs):
    kwargs.setdefault("max_tokens", 8)
    return client.messages.create(
        model=MODEL, messages=[{"role": "user", "content": text}], extra_body=GREEDY, **kwargs
    )


def prompt_len(server, messages: list[dict]) -> int:
    llm = server.app.state.server.llm
    return len(LineChatFormat(llm.tokenizer).encode_dialog(messages))


def test_create_answers_with_a_text_block_and_counts_tokens(server, client):
    out = ask(client, max_tokens=7)
    assert out.type == "message" and out.role == "assistant" and out.model == MODEL
    assert [b.type for b in out.content] == ["text"] and len(out.content[0].text) == 7
    assert out.stop_reason == "max_tokens" and out.stop_sequence is None
    assert out.usage.input_tokens == prompt_len(server, [{"role": "user", "content": "Hello"}])
    assert out.usage.output_tokens == 7


def test_system_prompt_as_text_or_blocks_is_the_same_prompt(server, client):
    as_text = ask(client, "Hi", system="Be brief.")
    as_blocks = ask(client, "Hi", system=[{"type": "text", "text": "Be brief."}])
    assert as_text.content[0].text == as_blocks.content[0].text
    expected = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert as_text.usage.input_tokens == prompt_len(server, expected)
    counted = client.messages.count_tokens(
        model=MODEL, system="Be brief.", messages=[{"role": "user", "content": "Hi"}]
    )
    assert counted.input_tokens == as_text.usage.input_tokens


def test_streaming_joins_to_the_non_streamed_answer(client):
    whole = ask(client, "Tell me a story", max_tokens=12)
    with client.messages.stream(
        model=MODEL,
        max_tokens=12,
        extra_body=GREEDY,
        messages=[{"role": "user", "content": "Tell me a story"}],
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text == final.content[0].text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 12
    assert final.usage.input_tokens == whole.usage.input_tokens


def test_the_event_stream_is_anthropics_sequence(server):
    body = {
        "model": MODEL,
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }
    headers = {"x-api-key": API_KEY, "anthropic-version": "2023-06-01"}
    with httpx.stream("POST", server.url + "/v1/messages", json=body, headers=headers) as r:
        lines = [line for line in r.iter_lines() if line]
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    datas = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert [d["type"] for d in datas] == names  # each data names its own event
    assert datas[-2]["delta"]["stop_reason"] == "max_tokens"


def test_a_stop_sequence_cuts_the_text_and_is_reported(client):
    full = ask(client, "Stop test", max_tokens=20).content[0].text
    stop = full[8:10]
    cut = ask(client, "Stop test", max_tokens=20, stop_sequences=[stop])
    assert cut.content[0].text == full[: full.index(stop)]
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop


def error_of(call) -> anthropic.APIStatusError:
    with pytest.raises(anthropic.APIStatusError) as info:
        call()
    return info.value


def raw(server, body, headers=None) -> httpx.Response:
    headers = {"x-api-key": API_KEY} if headers is None else headers
    return httpx.post(server.url + "/v1/messages", json=body, headers=headers)


@pytest.mark.parametrize(
    "body, words",
    [
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
        (
            {"model": MODEL, "max_tokens": "many", "messages": [{"role": "user", "content": "x"}]},
            "max_tokens",
        ),
        ({"model": MODEL, "max_tokens": 4, "messages": []}, "messages"),
        (
            {
                "model": MODEL,
                "max_tokens": 4,
                "temperature": 3,
                "messages": [{"role": "user", "content": "x"}],
            },
            "temperature",
        ),
        (
            {"model": MODEL, "max_tokens": 4, "messages": [{"role": "robot", "content": "x"}]},
            "role",
        ),
        ({"max_tokens": 4, "messages": [{"role": "user", "content": "x"}]}, "model"),
    ],
)
def test_bad_requests_are_400_in_anthropics_shape(server, body, words):
    r = raw(server, body)
    assert r.status_code == 400
    error = r.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert words in error["error"]["message"]


def test_unknown_model_is_a_404_not_found_error(client):
    err = error_of(
        lambda: client.messages.create(
            model="claude-9", max_tokens=4, messages=[{"role": "user", "content": "x"}]
        )
    )
    assert err.status_code == 404 and err.body["error"]["type"] == "not_found_error"


def test_a_prompt_past_the_context_is_a_400(client):
    err = error_of(lambda: ask(client, "y" * 200))
    assert err.status_code == 400 and err.body["error"]["type"] == "invalid_request_error"
    assert "128" in err.body["error"]["message"]
    err = error_of(lambda: ask(client, "y" * 100, max_tokens=60))
    assert err.status_code == 400 and "max_tokens" in err.body["error"]["message"]


def test_malformed_json_is_a_400(server):
    r = httpx.post(
        server.url + "/v1/messages",
        content=b"{nope",
        headers={"x-api-key": API_KEY, "content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_the_key_is_checked_in_either_header(server, client):
    body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}
    assert raw(server, body, {"x-api-key": API_KEY}).status_code == 200
    assert raw(server, body, {"authorization": f"Bearer {API_KEY}"}).status_code == 200
    r = raw(server, body, {"x-api-key": "wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    bad = anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0)
    assert error_of(lambda: ask(bad)).status_code == 401
