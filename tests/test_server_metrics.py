"""/metrics (Prometheus text, parsed with prometheus_client's own parser), /tokenize and
/detokenize, on the tiny server (tiny_server.py)."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tiny_server import API_KEY, MODEL, build_llm

from llamarun.server import create_app

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=AUTH, timeout=30)


def scrape(server) -> dict[tuple[str, tuple], float]:
    """Every sample as (name, sorted labels) -> value."""
    r = httpx.get(server.url + "/metrics", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def chat(server, content: str, max_tokens: int = 5) -> dict:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
    }
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 200
    return r.json()


def test_counters_move_with_traffic(server):
    before = scrape(server)
    ok = ("llamarun_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "200")))
    bad = ("llamarun_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "400")))
    answer = chat(server, "count me")
    assert post(server, "/v1/chat/completions", {"model": MODEL}).status_code == 400
    after = scrape(server)
    assert after[ok] - before.get(ok, 0) == 1 and after[bad] - before.get(bad, 0) == 1
    usage = answer["usage"]
    grew = {
        name: after[(name, ())] - before.get((name, ()), 0)
        for name in (
            "llamarun_prompt_tokens_total",
            "llamarun_generation_tokens_total",
            "llamarun_time_to_first_token_seconds_count",
            "llamarun_time_per_output_token_seconds_count",
        )
    }
    assert grew == {
        "llamarun_prompt_tokens_total": usage["prompt_tokens"],
        "llamarun_generation_tokens_total": usage["completion_tokens"],
        "llamarun_time_to_first_token_seconds_count": 1,
        "llamarun_time_per_output_token_seconds_count": usage["completion_tokens"] - 1,
    }


def test_the_prefix_cache_and_the_engine_are_reported(server):
    system = "q" * 70
    chat(server, system + " first")
    before = scrape(server)
    answer = chat(server, system + " second")
    after = scrape(server)
    cached = answer["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == 64
    hits = ("llamarun_prefix_cache_hits_total", ())
    reused = ("llamarun_prefix_cache_cached_tokens_total", ())
    prefilled = ("llamarun_prompt_tokens_prefilled_total", ())
    assert after[hits] - before[hits] == 1 and after[reused] - before[reused] == cached
    assert after[prefilled] - before[prefilled] == answer["usage"]["prompt_tokens"] - cached
    assert after[("llamarun_requests_running", ())] == 0
    assert after[("llamarun_requests_waiting", ())] == 0
    assert after[("llamarun_kv_cache_usage_ratio", ())] == 0
    assert (
        0
        < after[("llamarun_prefix_cache_bytes", ())]
        <= after[("llamarun_prefix_cache_capacity_bytes", ())]
    )


def test_two_apps_in_one_process_keep_their_own_counters():
    first, second = (create_app(build_llm(1), model_name=MODEL) for _ in range(2))
    first.state.server.metrics.requests.labels("/x", "200").inc()
    assert (
        second.state.server.metrics.registry.get_sample_value(
            "llamarun_requests_total", {"endpoint": "/x", "status": "200"}
        )
        is None
    )


def test_tokenize_and_detokenize_round_trip(server):
    tokenizer = server.app.state.server.tokenizer
    got = post(server, "/tokenize", {"content": "Hello"}).json()
    assert got == {"tokens": tokenizer.encode("Hello", bos=False)}
    with_bos = post(server, "/tokenize", {"content": "Hello", "add_special": True}).json()
    assert with_bos["tokens"] == tokenizer.encode("Hello")
    pieces = post(server, "/tokenize", {"content": "Hello", "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == got["tokens"]
    assert "".join(p["piece"] for p in pieces) == "Hello"
    assert post(server, "/detokenize", got).json() == {"content": "Hello"}


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/tokenize", {}, "content"),
        ("/tokenize", {"content": 5}, "content"),
        ("/detokenize", {"tokens": "abc"}, "tokens"),
        ("/detokenize", {"tokens": [1, 99999]}, "tokens"),
    ],
)
def test_bad_tokenize_requests_are_400(server, path, body, param):
    r = post(server, path, body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_the_key_guards_metrics_and_tokenize(server):
    assert httpx.get(server.url + "/metrics").status_code == 401
    assert httpx.post(server.url + "/tokenize", json={"content": "x"}).status_code == 401
