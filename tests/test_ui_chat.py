"""The chat page in headless Chromium against a real `llamarun serve` with SmolLM2-135M-Instruct
(CPU, greedy, context 512): answers stream in, Stop frees the server's slot, code blocks copy,
conversations survive a reload, the settings reach the request, regenerate and edit-and-resend,
and a too-long conversation is explained in the page."""

from __future__ import annotations

import re
import subprocess
import sys

import httpx
import pytest
from chat_page import (
    ask,
    launch,
    need_browser,
    screenshot,
    set_setting,
    wait_answer,
    wait_for,
)
from conftest import shared_model

sync_api = need_browser()

SMOLLM2 = "smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
CONTEXT = 512
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def server():
    """`llamarun serve` as a user runs it; the URL comes from the line it prints for the page."""
    cmd = [sys.executable, "-m", "llamarun", "serve", str(shared_model(SMOLLM2)), "--port", "0"]
    cmd += ["--max-seq-len", str(CONTEXT), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stderr.readline() for _ in range(2)]
        found = re.search(r"chat page at (http://\S+/)$", lines[1].strip())
        assert found, f"llamarun serve did not print the page's URL: {lines}"
        url = found.group(1)
        wait_for(lambda: healthy(url), timeout=60, what="the server to answer /health")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def healthy(url: str) -> bool:
    try:
        return httpx.get(url + "health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def running(url: str) -> int:
    return httpx.get(url + "health", timeout=5).json()["running"]


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = launch(playwright)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    """A fresh browser profile (empty localStorage) on the page, answers capped for speed."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.rstrip("/"))
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(e))
    page.goto(server)
    page.locator("#model option").first.wait_for(state="attached")
    set_setting(page, "Max tokens", "48")
    yield page
    context.close()
    assert not errors, f"the page raised: {errors}"


def chat_requests(page) -> list[dict]:
    """Bodies of the page's requests to /v1/chat/completions, as they are sent."""
    bodies = []
    page.on(
        "request",
        lambda r: bodies.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else 0,
    )
    return bodies


def test_answer_streams_in_and_names_paris(page):
    # Every re-render of the answer is recorded in the page, so the growth is seen as it happens.
    page.evaluate("""() => {
        window.seen = [];
        new MutationObserver(() => {
            const bodies = document.querySelectorAll("#messages article.assistant .body");
            if (bodies.length) window.seen.push(bodies[bodies.length - 1].textContent);
        }).observe(document.getElementById("messages"), {childList: true, subtree: true, characterData: true});
    }""")
    ask(page, QUESTION)
    answer = wait_answer(page)

    assert "Paris" in answer
    seen = [t for t in dict.fromkeys(page.evaluate("window.seen")) if t]
    assert len(seen) >= 3, f"the answer did not grow in steps: {seen}"
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:])), seen
    assert seen[-1] == answer
    stats = page.locator("article.assistant .stats").inner_text()
    assert re.fullmatch(r"\d+ tokens · [\d.]+ tokens/s · time to first token [\d.]+ s", stats), (
        stats
    )
    screenshot(page, "smollm2-answer")


def test_stop_ends_the_stream_and_frees_the_slot(page, server):
    set_setting(page, "Max tokens", "400")
    ask(page, "Write a long story about a dragon who learns to bake bread.")
    body = page.locator("article.assistant .body")
    wait_for(lambda: len(body.inner_text()) > 40, timeout=60, what="the answer to start")
    assert running(server) == 1
    page.get_by_role("button", name="Stop").click()

    page.get_by_role("button", name="Send").wait_for()
    assert "stopped" in page.locator("article.assistant .stats").inner_text()
    wait_for(lambda: running(server) == 0, timeout=10, what="/health to show the slot free")
    text = body.inner_text()
    page.wait_for_timeout(500)
    assert body.inner_text() == text  # nothing more arrives

    page.get_by_role("button", name="Regenerate").click()
    page.get_by_role("button", name="Stop").click()  # at once: before the first token, even
    page.get_by_role("button", name="Send").wait_for()
    wait_for(lambda: running(server) == 0, timeout=10, what="/health to show the slot free")


def test_code_block_renders_with_a_working_copy_button(page):
    set_setting(page, "Max tokens", "120")
    ask(page, "Write a Python function that adds two numbers, in a code block.")
    wait_answer(page)

    code = page.locator("article.assistant pre > code")
    assert code.count() == 1
    assert "def " in code.inner_text() and "return" in code.inner_text()
    page.get_by_role("button", name="Copy code").click()
    page.get_by_role("button", name="Copy code").filter(has_text="Copied").wait_for()
    assert page.evaluate("navigator.clipboard.readText()") == code.text_content()


def test_reload_keeps_the_conversation(page):
    ask(page, QUESTION)
    answer = wait_answer(page)
    page.reload()

    turns = page.locator("#messages > article")
    assert turns.count() == 2
    assert turns.nth(0).locator(".body").inner_text() == QUESTION
    assert turns.nth(1).locator(".body").inner_text() == answer
    assert page.locator("#chat-list li").all_inner_texts()[0].startswith(QUESTION)


def test_new_chat_switch_and_delete(page):
    ask(page, QUESTION)
    wait_answer(page)
    page.get_by_role("button", name="New chat").click()
    assert page.locator("#messages > article").count() == 0
    ask(page, "Say hello.")
    wait_answer(page)
    chats = page.locator("#chat-list .open")
    assert chats.all_inner_texts() == ["Say hello.", QUESTION]  # the latest first

    chats.nth(1).click()
    assert page.locator("#messages article.user .body").inner_text() == QUESTION
    page.get_by_role("button", name=f"Delete {QUESTION}").click()
    assert chats.all_inner_texts() == ["Say hello."]
    assert page.locator("#messages > article").count() == 0
    page.reload()
    assert page.locator("#chat-list .open").all_inner_texts() == ["Say hello."]


def test_changed_settings_are_in_the_request(page):
    bodies = chat_requests(page)
    ask(page, QUESTION)
    wait_answer(page)
    set_setting(page, "Temperature", "0.7")
    set_setting(page, "Top-p", "0.9")
    set_setting(page, "Seed", "42")
    set_setting(page, "Max tokens", "8")
    set_setting(page, "System prompt", "Answer in one word.")
    page.get_by_role("button", name="Regenerate").click()
    wait_answer(page)

    before, after = bodies
    assert before["temperature"] == 0 and before["max_tokens"] == 48
    assert before["stream"] is True and before["stream_options"] == {"include_usage": True}
    assert (after["temperature"], after["top_p"], after["seed"]) == (0.7, 0.9, 42)
    assert after["max_tokens"] == 8
    assert after["messages"][0] == {"role": "system", "content": "Answer in one word."}
    assert after["messages"][1:] == before["messages"]
    page.reload()  # the settings are kept too
    assert page.get_by_label("Temperature", exact=True).input_value() == "0.7"


def test_regenerate_and_edit_resend_the_last_question(page):
    bodies = chat_requests(page)
    ask(page, QUESTION)
    first = wait_answer(page)
    page.get_by_role("button", name="Regenerate").click()
    assert wait_answer(page) == first  # greedy: the same answer again, in place of the old one
    assert page.locator("#messages > article").count() == 2

    page.get_by_role("button", name="Edit").click()  # the question goes back to the composer
    box = page.get_by_label("Message", exact=True)
    assert box.input_value() == QUESTION
    assert page.evaluate("document.activeElement.id") == "message"
    box.fill("What is the capital of Italy?")
    page.get_by_role("button", name="Send").click()
    wait_answer(page)

    assert [b["messages"] for b in bodies] == [
        [{"role": "user", "content": QUESTION}],
        [{"role": "user", "content": QUESTION}],
        [{"role": "user", "content": "What is the capital of Italy?"}],
    ]
    assert page.locator("#messages article.user .body").all_inner_texts() == [
        "What is the capital of Italy?"
    ]


def test_too_long_conversation_is_explained(page):
    ask(page, "word " * 600)  # more tokens than the server's 512 of context

    error = page.locator("#messages article.error[role=alert]")
    error.wait_for()
    text = error.inner_text()
    assert "too long for the model's context" in text
    assert f"max_seq_len is {CONTEXT}" in text  # the server's own numbers come along
    assert page.locator("#messages article.assistant").count() == 0


def test_stopped_server_is_explained(page):
    page.route("**/v1/chat/completions", lambda route: route.abort("connectionrefused"))
    ask(page, QUESTION)

    error = page.locator("#messages article.error[role=alert]")
    error.wait_for()
    assert "Cannot reach the server" in error.inner_text()
    page.unroute("**/v1/chat/completions")
    page.get_by_role("button", name="Regenerate").click()  # and it recovers once it is back
    assert "Paris" in wait_answer(page)
