"""The OpenAI-compatible server, tested over real HTTP with the official `openai` client.

A tiny random model with a printable-character tokenizer and a minimal chat format stand in for a
real model: the server only needs the Tokenizer protocol and encode_dialog/stop_ids.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from conftest import shared_model
from tiny_server import API_KEY, BOS, MODEL, LineChatFormat, ServerThread, build_llm

from llamarun import LLM
from llamarun.server import create_app

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=30)


def chat(client, content: str, **kwargs):
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], **kwargs
    )


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_health(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_completion_counts_tokens_and_stops_at_length(client):
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=7, temperature=0)
    assert out.choices[0].finish_reason == "length"
    assert len(out.choices[0].text) == 7  # one printable character per token
    assert out.usage.prompt_tokens == 6  # BOS + 5 characters
    assert out.usage.completion_tokens == 7 and out.usage.total_tokens == 13


def test_completion_accepts_token_ids_and_several_prompts(client):
    by_text = client.completions.create(
        model=MODEL, prompt=["Hi", "Yo"], max_tokens=5, temperature=0
    )
    by_ids = client.completions.create(
        model=MODEL, prompt=[[BOS, 40, 73], [BOS, 57, 79]], max_tokens=5, temperature=0
    )
    assert [c.text for c in by_text.choices] == [c.text for c in by_ids.choices]
    assert by_text.choices[0].text != by_text.choices[1].text


def test_completion_streaming_joins_to_the_non_streamed_answer(client):
    ask = dict(model=MODEL, prompt="Once", max_tokens=9, temperature=0, echo=True)
    whole = client.completions.create(**ask)
    chunks = list(
        client.completions.create(**ask, stream=True, stream_options={"include_usage": True})
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert whole.choices[0].text.startswith("Once") and len(whole.choices[0].text) == 4 + 9
    assert chunks[-1].usage.completion_tokens == 9 and chunks[-1].usage.prompt_tokens == 5


def test_chat_streaming_joins_to_the_non_streamed_answer(client):
    whole = chat(client, "Tell me a story", max_tokens=20)
    stream = chat(
        client,
        "Tell me a story",
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and len(text) == 20
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_stream_ends_with_done(server):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
        "stream": True,
    }
    with httpx.stream(
        "POST",
        server.url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {API_KEY}"},
    ) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_n2_sampled_choices_differ(client):
    out = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Go"}],
        n=2,
        max_tokens=16,
        temperature=1.0,
        seed=3,
    )
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[0].message.content != out.choices[1].message.content
    again = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Go"}],
        n=2,
        max_tokens=16,
        temperature=1.0,
        seed=3,
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in out.choices]
    assert out.usage.completion_tokens == 32


def test_usage_counts_the_prompt_tokens_the_prefix_cache_held(client):
    system = {"role": "system", "content": "s" * 70}  # BOS + "system: " + 70 + "\n" + "user: "

    def ask(question: str):
        return client.chat.completions.create(
            model=MODEL,
            messages=[system, {"role": "user", "content": question}],
            max_tokens=8,
            temperature=0,
        )

    cold = ask("a question")
    warm = ask("another question")
    assert warm.usage.prompt_tokens_details.cached_tokens == 64  # the 86 shared, in 32s
    again = ask("a question")
    assert again.usage.prompt_tokens_details.cached_tokens == 96  # all but its last chunk
    assert again.choices[0].message.content == cold.choices[0].message.content


def test_stop_string_cuts_the_text_and_reports_stop(client):
    full = chat(client, "Stop test", max_tokens=24).choices[0].message.content
    stop = full[10:12]
    cut = chat(client, "Stop test", max_tokens=24, stop=[stop, "\x00never"])
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_chat_logprobs_match_the_chosen_tokens(client):
    out = chat(client, "Scores", max_tokens=5, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert "".join(t.token for t in content) == out.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob)  # greedy picks the best
        assert t.top_logprobs[0].token == t.token


def test_completion_echo_with_logprobs_scores_the_prompt(client):
    out = client.completions.create(
        model=MODEL, prompt="abc", max_tokens=2, temperature=0, echo=True, logprobs=2
    )
    lp = out.choices[0].logprobs
    assert out.choices[0].text.startswith("abc") and len(out.choices[0].text) == 5
    assert lp.tokens[:4] == ["", "a", "b", "c"]  # BOS prints as nothing
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    assert len(lp.token_logprobs) == 6 and lp.text_offset[-1] == 4


def error_of(call) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    return info.value


def test_invalid_value_is_a_400_naming_the_parameter(client):
    err = error_of(lambda: chat(client, "x", temperature=-1))
    assert err.status_code == 400 and err.body["param"] == "temperature"
    assert err.body["type"] == "invalid_request_error" and "temperature" in err.body["message"]


def test_malformed_json_is_a_400(server):
    r = httpx.post(
        server.url + "/v1/chat/completions",
        content=b"{not json",
        headers={"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"},
    )
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_unknown_fields_are_ignored(client):
    out = chat(
        client, "x", max_tokens=2, extra_body={"logit_bias_unknown": {"1": 2}, "frobnicate": True}
    )
    assert out.choices[0].finish_reason == "length"


def test_wrong_or_missing_key_is_a_401(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    assert error_of(lambda: bad.models.list()).status_code == 401
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_unknown_model_is_a_404(client):
    err = error_of(lambda: client.completions.create(model="gpt-9", prompt="x"))
    assert err.status_code == 404 and err.body["param"] == "model"


def test_prompt_plus_max_tokens_beyond_context_is_a_400_with_numbers(client):
    err = error_of(lambda: client.completions.create(model=MODEL, prompt="y" * 100, max_tokens=50))
    assert err.status_code == 400 and err.body["param"] == "max_tokens"
    assert (
        "128" in err.body["message"]
        and "101" in err.body["message"]
        and "50" in err.body["message"]
    )


def test_concurrent_greedy_requests_equal_the_same_requests_alone(client):
    prompts = [f"Request number {i} {'x' * i}" for i in range(8)]

    def ask(i: int) -> str:
        out = client.completions.create(
            model=MODEL, prompt=prompts[i], max_tokens=12 + i, temperature=0
        )
        return out.choices[0].text

    alone = [ask(i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, range(8)))
    assert together == alone


def test_bad_request_does_not_disturb_others(client):
    with ThreadPoolExecutor(4) as pool:
        good = pool.submit(lambda: chat(client, "steady", max_tokens=10))
        bad = [
            pool.submit(
                error_of, lambda: client.completions.create(model=MODEL, prompt=[[BOS, 9999]])
            )
            for _ in range(3)
        ]
        assert all(b.result().status_code == 400 for b in bad)
        assert (
            good.result().choices[0].message.content
            == chat(client, "steady", max_tokens=10).choices[0].message.content
        )


def test_engine_failure_fails_only_that_request(server, client, monkeypatch):
    engine = server.app.state.scheduler.engine
    add = engine.add

    def flaky_add(slot, prompt_ids, params, **kwargs):
        if ord("~") - 32 in prompt_ids:
            raise RuntimeError("boom")
        return add(slot, prompt_ids, params, **kwargs)

    monkeypatch.setattr(engine, "add", flaky_add)
    expected = chat(client, "fine", max_tokens=6).choices[0].message.content
    with ThreadPoolExecutor(2) as pool:
        bad = pool.submit(error_of, lambda: chat(client, "~", max_tokens=6))
        good = pool.submit(lambda: chat(client, "fine", max_tokens=6))
        assert bad.result().status_code == 500 and bad.result().body["type"] == "server_error"
        assert good.result().choices[0].message.content == expected


def test_disconnected_streaming_client_frees_its_slot(server, monkeypatch):
    scheduler = server.app.state.scheduler
    step = scheduler.engine.step
    monkeypatch.setattr(
        scheduler.engine, "step", lambda: (time.sleep(0.02), step())[1]
    )  # 100 tokens: 2 s
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "long"}],
        "max_tokens": 100,
        "stream": True,
        "temperature": 0,
    }
    with httpx.stream(
        "POST",
        server.url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {API_KEY}"},
    ) as r:
        chunks = (json.loads(line.removeprefix("data: ")) for line in r.iter_lines() if line)
        assert (
            next(c for c in chunks if c["choices"][0]["delta"].get("content"))["object"]
            == "chat.completion.chunk"
        )
        assert len(scheduler.running) == 1
    left = time.monotonic()
    while scheduler.running and time.monotonic() - left < 1.5:
        time.sleep(0.01)
    assert not scheduler.running and time.monotonic() - left < 0.5


def test_shutdown_finishes_in_flight_streams_then_stops_the_engine(monkeypatch):
    llm = build_llm(max_batch_size=2)
    app = create_app(llm, model_name=MODEL, chat_format=LineChatFormat(llm.tokenizer))
    running, scheduler = ServerThread(app), app.state.scheduler
    step = scheduler.engine.step
    monkeypatch.setattr(scheduler.engine, "step", lambda: (time.sleep(0.01), step())[1])
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "bye"}],
        "max_tokens": 40,
        "stream": True,
        "temperature": 0,
    }
    with httpx.stream("POST", running.url + "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        next(line for line in lines if '"content":"' in line and '"content":""' not in line)
        running.server.should_exit = True  # what uvicorn's SIGTERM handler sets
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]" and '"finish_reason":"length"' in rest[-2]
    running.thread.join(timeout=10)
    assert not running.thread.is_alive() and not scheduler.thread.is_alive()


@pytest.mark.slow
def test_serve_cli_answers_then_exits_on_sigterm():
    model = shared_model("stories260K/stories260K.bin")
    cmd = [
        sys.executable,
        "-m",
        "llamarun",
        "serve",
        str(model),
        "--tokenizer",
        str(model.parent / "tok512.model"),
        "--port",
        "0",
        "--max-seq-len",
        "256",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        url = re.search(r"http://\S+/v1", line).group(0)
        out = openai.OpenAI(base_url=url, api_key="none", timeout=60).completions.create(
            model="stories260K", prompt="Once upon a time", max_tokens=8, temperature=0
        )
        assert out.choices[0].text.startswith(
            ", there was a little girl"
        )  # llama2.c's run.c output
        with pytest.raises(openai.BadRequestError, match="only continues text"):
            openai.OpenAI(base_url=url, api_key="none", timeout=60).chat.completions.create(
                model="stories260K", messages=[{"role": "user", "content": "hi"}]
            )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) in (0, -signal.SIGTERM)
    finally:
        proc.kill()


@pytest.mark.slow
def test_real_chat_model_answers_and_streams_the_same_text():
    import llamarun

    llm = llamarun.load(
        shared_model("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"),
        max_batch_size=2,
        max_seq_len=256,
    )
    running = ServerThread(create_app(llm, model_name="smollm2"))
    try:
        client = openai.OpenAI(
            base_url=running.url + "/v1", api_key="none", max_retries=0, timeout=120
        )
        ask = dict(
            model="smollm2",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0,
            max_tokens=30,
        )
        whole = client.chat.completions.create(**ask)
        streamed = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(**ask, stream=True)
        )
        assert whole.choices[0].message.content == "The capital of France is Paris." == streamed
        assert (
            whole.choices[0].finish_reason == "stop"
        )  # ended by <|im_end|>, the chat format's stop id
    finally:
        running.stop()


@pytest.fixture(scope="module")
def speculating_server():
    """The same tiny model with prompt lookup (k fixed at 4, so every match is checked)."""
    from llamarun.speculate import LookupDrafter, Speculator

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    plain = build_llm()
    llm = LLM(
        plain.model, plain.tokenizer, speculator=Speculator(LookupDrafter(), method="lookup", k=4)
    )
    running = ServerThread(create_app(llm, model_name=MODEL, api_key=API_KEY))
    yield running
    running.stop()
    torch.set_num_threads(threads)


def test_speculating_server_gives_the_plain_greedy_text_and_reports_it(client, speculating_server):
    spec = openai.OpenAI(
        base_url=speculating_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=30
    )
    prompts = ["abcdabcdabcdabcd", "one two one two one two", "xyzxyzxyz"]

    def ask(c, prompt: str) -> str:
        out = c.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0)
        return out.choices[0].text

    expected = [ask(client, p) for p in prompts]
    assert [ask(spec, p) for p in prompts] == expected
    with ThreadPoolExecutor(3) as pool:  # together they decode plainly: still the same text
        assert list(pool.map(lambda p: ask(spec, p), prompts)) == expected
    health = httpx.get(speculating_server.url + "/health").json()
    stats = health["speculation"]
    assert stats["method"] == "lookup (k=4)" and stats["rounds"] > 0
    assert stats["batched_steps"] > 0  # steps with the three requests running together
    auth = {"Authorization": f"Bearer {API_KEY}"}
    metrics = httpx.get(speculating_server.url + "/metrics", headers=auth).text  # for Prometheus

    def counter(name: str) -> float:
        return float(re.search(rf"^llamarun_speculative_{name}_total (\S+)$", metrics, re.M)[1])

    assert counter("rounds") == stats["rounds"] and counter("fallback_steps") > 0
    assert counter("accepted_tokens") <= counter("draft_tokens")
    assert "llamarun_speculative_acceptance_ratio " in metrics


def test_a_lost_rank_is_the_servers_failure_in_every_api_shape():
    """A distributed server whose other rank is gone answers 503 (server at fault), not 400."""
    from llamarun.errors import DistributedError, RequestError
    from llamarun.server.anthropic import anthropic_error
    from llamarun.server.http_errors import failure_of, openai_error
    from llamarun.server.ollama import ollama_error

    lost = failure_of(DistributedError("lost contact with rank 1 (connection reset)"))
    assert (lost.status, lost.code) == (503, 503)
    assert openai_error(lost)["error"]["type"] == "server_error"
    assert anthropic_error(lost)["error"]["type"] == "api_error"
    assert ollama_error(lost) == {"error": "lost contact with rank 1 (connection reset)"}
    assert failure_of(RequestError("bad", param="x")).status == 400  # the request's own fault
