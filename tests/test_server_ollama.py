"""ollama's native API over real HTTP with the official `ollama` client, on the tiny server
(tiny_server.py): list, show, chat, generate (streamed and whole), options, ollama's errors."""

from __future__ import annotations

import json

import httpx
import ollama
import pytest
from tiny_server import API_KEY, MODEL, LineChatFormat

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
GREEDY = {"temperature": 0, "num_predict": 8}
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def client(server) -> ollama.Client:
    return ollama.Client(host=server.url, headers=AUTH, timeout=30)


def prompt_len(server, messages: list[dict]) -> int:
    llm = server.app.state.server.llm
    return len(LineChatFormat(llm.tokenizer).encode_dialog(messages))


def test_list_and_show_describe_the_served_model(client):
    models = client.list().models
    assert [m.model for m in models] == [MODEL]
    assert models[0].details.family == "llama" and models[0].modified_at is not None
    shown = client.show(MODEL)
    assert shown.modelinfo["llama.context_length"] == 128
    assert shown.modelinfo["llama.block_count"] == 2 and "chat" in shown.capabilities
    assert client.show(f"{MODEL}:latest").modelinfo == shown.modelinfo


def test_version(server):
    assert httpx.get(server.url + "/api/version", headers=AUTH).json()["version"]


def test_chat_answers_and_counts_tokens(server, client):
    messages = [{"role": "user", "content": "Hello"}]
    out = client.chat(model=MODEL, messages=messages, options=GREEDY)
    assert out.message.role == "assistant" and len(out.message.content) == 8
    assert out.done and out.done_reason == "length" and out.eval_count == 8
    assert out.prompt_eval_count == prompt_len(server, messages)
    assert out.total_duration >= out.eval_duration >= 0


def test_chat_streaming_joins_to_the_whole_answer(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A story"}]
    whole = client.chat(model=MODEL, messages=messages, options=GREEDY)
    parts = list(client.chat(model=MODEL, messages=messages, options=GREEDY, stream=True))
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert parts[-1].eval_count == whole.eval_count
    assert parts[-1].prompt_eval_count == whole.prompt_eval_count


def test_generate_templated_raw_and_streamed(server, client):
    whole = client.generate(model=MODEL, prompt="Once", system="Be brief.", options=GREEDY)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Once"}]
    assert whole.prompt_eval_count == prompt_len(server, messages)
    streamed = list(
        client.generate(model=MODEL, prompt="Once", system="Be brief.", options=GREEDY, stream=True)
    )
    assert "".join(p.response for p in streamed) == whole.response
    raw = client.generate(model=MODEL, prompt="Once", raw=True, options=GREEDY)
    assert raw.prompt_eval_count == 5  # BOS + 4 characters: no template
    assert raw.context[:5] == [256, *(ord(c) - 32 for c in "Once")]


def test_generate_continues_from_an_earlier_context(client):
    first = client.generate(model=MODEL, prompt="Hi", raw=True, options=GREEDY)
    more = client.generate(model=MODEL, prompt="!", raw=True, context=first.context, options=GREEDY)
    assert more.prompt_eval_count == len(first.context) + 1


def test_options_map_onto_sampling(client):
    messages = [{"role": "user", "content": "Roll"}]
    sampled = [
        client.chat(
            model=MODEL,
            messages=messages,
            options={"temperature": 1.0, "seed": 5, "num_predict": 12},
        )
        for _ in range(2)
    ]
    assert sampled[0].message.content == sampled[1].message.content  # seeded: reproducible
    full = client.chat(
        model=MODEL, messages=messages, options={**GREEDY, "num_predict": 20}
    ).message.content
    stop = full[6:8]
    cut = client.chat(
        model=MODEL, messages=messages, options={**GREEDY, "num_predict": 20, "stop": [stop]}
    )
    assert cut.message.content == full[: full.index(stop)] and cut.done_reason == "stop"


def test_an_empty_request_only_loads_the_model(client):
    assert client.generate(model=MODEL).done_reason == "load"


def error_of(call) -> ollama.ResponseError:
    with pytest.raises(ollama.ResponseError) as info:
        call()
    return info.value


def test_an_unknown_model_is_a_404_in_ollamas_shape(server, client):
    err = error_of(lambda: client.chat(model="llama9", messages=[{"role": "user", "content": "x"}]))
    assert err.status_code == 404 and "llama9" in err.error
    r = httpx.post(server.url + "/api/show", json={"model": "llama9"}, headers=AUTH)
    assert r.status_code == 404 and set(r.json()) == {"error"}


@pytest.mark.parametrize(
    "path, body",
    [
        ("/api/chat", {"messages": [{"role": "user", "content": "x"}]}),
        ("/api/chat", {"model": MODEL, "messages": "hello"}),
        (
            "/api/chat",
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": "x"}],
                "options": {"temperature": "hot"},
            },
        ),
        (
            "/api/chat",
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": "x"}],
                "options": {"top_p": 7},
            },
        ),
        ("/api/generate", {"model": MODEL, "prompt": 3}),
        ("/api/generate", {"model": MODEL, "prompt": "y" * 200}),
    ],
)
def test_bad_requests_are_400_in_ollamas_shape(server, path, body):
    r = httpx.post(server.url + path, json=body, headers=AUTH)
    assert r.status_code == 400 and set(r.json()) == {"error"} and r.json()["error"]


def test_a_wrong_key_is_a_401(server):
    r = httpx.get(server.url + "/api/tags", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and "API key" in r.json()["error"]


def test_streamed_lines_are_json_objects(server):
    body = {"model": MODEL, "prompt": "hi", "raw": True, "options": GREEDY}
    with httpx.stream("POST", server.url + "/api/generate", json=body, headers=AUTH) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        parts = [json.loads(line) for line in r.iter_lines() if line]
    assert parts[-1]["done"] is True and all(not p["done"] for p in parts[:-1])
