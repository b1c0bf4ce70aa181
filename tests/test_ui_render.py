"""The chat page in headless Chromium against an in-process server with the tiny random model and
an --api-key: the key is asked for and sent; answers' markup (mocked in the browser, so the text
is exact) renders as markdown and never as HTML; errors inside a stream are shown; the keyboard
and a phone-width window work; axe-core finds no serious accessibility problem, in light and dark,
at desktop and phone width, and the screenshots of each go to test-artifacts/ui/."""

from __future__ import annotations

import json
import re

import pytest
from chat_page import (
    DESKTOP,
    PHONE,
    ask,
    close_panels,
    launch,
    need_browser,
    open_settings,
    screenshot,
    set_setting,
    wait_answer,
)
from test_server import LineChatFormat, ServerThread, build_llm

from llamarun.server import create_app

sync_api = need_browser()

KEY = "page-key"
CHAT_URL = "**/v1/chat/completions"


@pytest.fixture(scope="module")
def server():
    llm = build_llm(max_batch_size=2)
    app = create_app(llm, model_name="tiny", api_key=KEY, chat_format=LineChatFormat(llm.tokenizer))
    running = ServerThread(app)
    yield running.url + "/"
    running.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = launch(playwright)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser, server):
    """open_page(viewport, scheme, key=True): a fresh profile on the page, the API key entered."""
    contexts = []

    def opened(viewport=DESKTOP, scheme="light", key=True):
        context = browser.new_context(viewport=viewport, color_scheme=scheme)
        contexts.append(context)
        page = context.new_page()
        page.errors = []
        page.on("pageerror", lambda e: page.errors.append(e))
        page.goto(server)
        if key:
            enter_key(page)
        set_setting(page, "Max tokens", "8")  # the tiny model's context is 128 tokens
        return page

    yield opened
    for context in contexts:
        errors = [e for page in context.pages for e in page.errors]
        context.close()
        assert not errors, f"the page raised: {errors}"


def enter_key(page, key=KEY):
    open_settings(page)
    field = page.get_by_label("API key")
    field.fill(key)
    field.press("Tab")  # the key is taken when the field is left
    page.locator("#model option[value=tiny]").wait_for(state="attached")
    close_panels(page)


def sse(*events) -> str:
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


def mock_answer(page, *pieces, usage=True, status=200, body=None):
    """Answers the page's next chat requests with `pieces` of text, streamed as the server does."""
    chunks = [{"choices": [{"index": 0, "delta": {"content": p}}]} for p in pieces]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    if usage:
        chunks.append({"choices": [], "usage": {"completion_tokens": len(pieces)}})
    if body is None:
        body = sse(*chunks)
    page.route(
        CHAT_URL,
        lambda route: route.fulfill(status=status, body=body, content_type="text/event-stream"),
    )


ATTACKS = [
    "<script>window.pwned = 1</script>",
    '<img src="x" onerror="window.pwned = 2">',
    "[click me](javascript:window.pwned=3)",
    '<a href="javascript:window.pwned=4">a link</a>',
]


def test_the_key_is_asked_for_then_sent(open_page):
    page = open_page(key=False)
    banner = page.locator("#banner")
    banner.wait_for()
    assert "needs an API key" in banner.inner_text()
    ask(page, "hi")
    error = page.locator("article.error[role=alert]")
    error.wait_for()
    assert "Enter the key under Settings" in error.inner_text()

    sent = []
    page.on(
        "request", lambda r: sent.append(r.headers.get("authorization")) if "/v1/" in r.url else 0
    )
    enter_key(page)
    assert banner.is_hidden()
    page.get_by_role("button", name="Regenerate").click()
    wait_answer(page)  # the real tiny model answers once the key is right
    assert sent and set(sent) == {f"Bearer {KEY}"}
    page.reload()
    assert page.get_by_label("API key").input_value() == KEY


def test_model_text_that_looks_like_html_is_shown_as_text(open_page):
    page = open_page()
    mock_answer(page, *[a + "\n\n" for a in ATTACKS])
    ask(page, "show me some html")
    wait_answer(page)

    answer = page.locator("article.assistant .body")
    shown = answer.inner_text()
    for text in ATTACKS[0], ATTACKS[1], ATTACKS[3]:
        assert text in shown
    assert "click me" in shown
    assert answer.locator("script, img, a").count() == 0
    page.get_by_text("click me").click()
    page.wait_for_timeout(200)
    assert page.evaluate("window.pwned") is None


def test_markdown_renders(open_page):
    page = open_page()
    answer = """## Steps

1. **Bold** and *italic* with `inline <code>`
2. A [safe link](https://example.com/a?b=1&c=2) and a [mail](mailto:a@example.com)
   - nested item

```python
print("<hi>")
```

| a | b |
|---|---|
| 1 | 2 |"""
    mock_answer(page, *[answer[i : i + 7] for i in range(0, len(answer), 7)])
    ask(page, "markdown please")
    wait_answer(page)

    body = page.locator("article.assistant .body")
    assert body.locator("h2").inner_text() == "Steps"
    assert body.locator("ol > li").count() == 2
    assert body.locator("ol > li ul > li").inner_text() == "nested item"
    assert body.locator("strong").inner_text() == "Bold"
    assert body.locator("em").inner_text() == "italic"
    assert body.locator("li code").inner_text() == "inline <code>"
    link = body.get_by_role("link", name="safe link")
    assert link.get_attribute("href") == "https://example.com/a?b=1&c=2"
    assert "noopener" in link.get_attribute("rel")
    assert body.get_by_role("link", name="mail").get_attribute("href") == "mailto:a@example.com"
    assert body.locator("pre > code.language-python").inner_text() == 'print("<hi>")'
    assert body.locator("table th").all_inner_texts() == ["a", "b"]


def test_an_error_inside_the_stream_is_shown(open_page):
    page = open_page()
    error = {"error": {"message": "the engine failed: out of memory", "type": "server_error"}}
    body = sse({"choices": [{"index": 0, "delta": {"content": "Half an"}}]}, error)
    mock_answer(page, body=body)
    ask(page, "hi")

    alert = page.locator("article.error[role=alert]")
    alert.wait_for()
    assert "failed while answering" in alert.inner_text()
    assert "the engine failed: out of memory" in alert.inner_text()
    assert page.locator("article.assistant .body").inner_text() == "Half an"  # what came is kept


def pieces_of(*texts, finish=True) -> list[dict]:
    chunks = [{"choices": [{"index": 0, "delta": {"content": t}}]} for t in texts]
    if finish:
        chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    return chunks


SHAPES = {
    # another OpenAI-style server may end a stream without [DONE], or write CRLF
    "crlf-without-done": "".join(f"data: {json.dumps(c)}\r\n\r\n" for c in pieces_of("Par", "is")),
    "cut-off": "".join(f"data: {json.dumps(c)}\n\n" for c in pieces_of("Par", finish=False)),
    "not-json": "data: {oops\n\n",
}


@pytest.mark.parametrize(
    "shape, shown",
    [
        ("crlf-without-done", "Paris"),
        ("json", "Paris"),  # a server that ignores stream: true
        ("cut-off", "The connection to the server broke off"),
        ("not-json", "The server sent something that is not part of an answer: {oops"),
    ],
)
def test_answers_of_other_shapes_are_read_or_explained(open_page, shape, shown):
    page = open_page()
    if shape == "json":
        done = {"choices": [{"index": 0, "message": {"content": "Paris"}, "finish_reason": "stop"}]}
        page.route(CHAT_URL, lambda route: route.fulfill(json=done))
    else:
        mock_answer(page, body=SHAPES[shape])
    ask(page, "capital of France?")

    page.locator("article.assistant .stats, article.error[role=alert]").first.wait_for()
    assert shown in page.locator("#messages > article").last.inner_text()


def test_edit_can_be_cancelled(open_page):
    page = open_page()
    mock_answer(page, "ok")
    ask(page, "hi")
    wait_answer(page)
    box = page.get_by_label("Message", exact=True)
    box.fill("a draft")
    page.get_by_role("button", name="Edit").click()
    assert box.input_value() == "hi"
    note = page.locator("#editing-note")
    assert note.is_visible() and page.get_by_role("button", name="Regenerate").count() == 0
    box.press("Escape")

    assert box.input_value() == "a draft" and note.is_hidden()
    assert page.locator("#messages .body").all_inner_texts() == ["hi", "ok"]


def test_enter_sends_and_shift_enter_adds_a_line(open_page):
    page = open_page()
    mock_answer(page, "ok")
    bodies = []
    page.on(
        "request",
        lambda r: bodies.append(r.post_data_json) if r.url.endswith("/completions") else 0,
    )
    box = page.get_by_label("Message", exact=True)
    box.click()
    box.type("first line")
    box.press("Shift+Enter")
    box.type("second line")
    assert box.input_value() == "first line\nsecond line" and bodies == []
    box.press("Enter")
    wait_answer(page)

    assert bodies[0]["messages"][-1]["content"] == "first line\nsecond line"
    assert box.input_value() == "" and page.evaluate("document.activeElement.id") == "message"


def test_tab_order_and_visible_focus(open_page):
    page = open_page()
    mock_answer(page, "ok")
    ask(page, "hi")
    wait_answer(page)
    page.get_by_role("link", name="Skip to the message box").focus()
    order = []
    for _ in range(15):
        page.keyboard.press("Tab")
        order.append(
            page.evaluate("document.activeElement.id || document.activeElement.textContent")
        )
    assert order == [
        "new-chat",
        "hi",  # the conversation in the list, then its Delete button
        "Delete",
        "messages",  # the conversation, scrollable with the keyboard
        "Edit",
        "Regenerate",
        "message",
        "send",
        "model",
        "system",
        "temperature",
        "top-p",
        "max-tokens",
        "seed",
        "api-key",
    ]
    page.get_by_role("link", name="Skip to the message box").press("Enter")
    assert page.evaluate("document.activeElement.id") == "message"
    page.get_by_role("button", name="Send").focus()
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline == "solid"


def test_phone_width_fits_and_drawers_open_and_close(open_page):
    page = open_page(viewport=PHONE)
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    settings = page.locator("#settings")
    assert settings.is_hidden()
    toggle = page.get_by_role("button", name="Settings")
    toggle.click()
    assert settings.is_visible() and toggle.get_attribute("aria-expanded") == "true"
    assert page.evaluate("document.getElementById('settings').contains(document.activeElement)")
    page.keyboard.press("Escape")
    assert settings.is_hidden() and page.evaluate("document.activeElement.id") == "toggle-settings"
    page.get_by_role("button", name="Chats").click()
    assert page.get_by_role("button", name="New chat").is_visible()


RICH = """Here is **a function** with a short note:

```python
def add(a, b):
    return a + b
```

- it adds *two* numbers
- see [the docs](https://docs.python.org/3/)"""


@pytest.mark.parametrize("scheme", ["light", "dark"])
@pytest.mark.parametrize("size", ["desktop", "phone"])
def test_no_serious_accessibility_problems(open_page, scheme, size):
    Axe = pytest.importorskip("axe_playwright_python.sync_playwright").Axe  # axe-core's JS inside

    page = open_page(viewport=DESKTOP if size == "desktop" else PHONE, scheme=scheme)
    serious_problems(Axe, page, f"{scheme}-{size}-empty")
    mock_answer(page, *re.findall(r"\S+\s*", RICH))
    ask(page, "Write a function that adds two numbers.")
    wait_answer(page)
    context_error = {"error": {"message": "the prompt has 900 tokens but max_seq_len is 512"}}
    page.unroute(CHAT_URL)
    mock_answer(page, status=400, body=json.dumps(context_error))
    ask(page, "word " * 50)
    page.locator("article.error").wait_for()

    states = {f"{scheme}-{size}": None}
    if size == "phone":
        states[f"{scheme}-{size}-settings"] = "Settings"
    for name, drawer in states.items():
        if drawer:
            page.get_by_role("button", name=drawer).click()
        screenshot(page, name)
        serious_problems(Axe, page, name)


def serious_problems(Axe, page, name: str) -> None:
    found = Axe().run(page).response["violations"]
    serious = [(v["id"], v["help"]) for v in found if v["impact"] in ("serious", "critical")]
    assert not serious, f"{name}: {serious}"
