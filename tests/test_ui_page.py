"""The chat page's files as the server sends them (no browser needed): GET / with a strict
Content-Security-Policy, only the page's own local files, nothing fetched from elsewhere."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient
from test_server import LineChatFormat, build_llm

from llamarun.cli.serve import page_url
from llamarun.server import create_app, ui


@pytest.fixture(scope="module")
def client() -> TestClient:
    llm = build_llm(max_batch_size=1)
    app = create_app(llm, model_name="tiny", api_key="k", chat_format=LineChatFormat(llm.tokenizer))
    return TestClient(app)  # not entered: the engine thread is not needed to send files


def csp_of(response) -> dict[str, list[str]]:
    policy = response.headers["content-security-policy"]
    return {d.split()[0]: d.split()[1:] for d in policy.split(";") if d.strip()}


def test_page_is_served_at_the_root_with_a_strict_csp(client):
    r = client.get("/")  # no API key: the key guards /v1, and the page asks for it

    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = csp_of(r)
    assert csp["default-src"] == ["'none'"]
    assert csp["script-src"] == ["'self'"] and csp["connect-src"] == ["'self'"]
    assert not any("unsafe" in v for values in csp.values() for v in values)
    assert r.headers["x-content-type-options"] == "nosniff"
    html = r.text
    # the CSP would block inline code anyway; the page must not depend on any
    assert re.findall(r"<script\b[^>]*>(.*?)</script>", html, re.S) == [""]
    assert not re.search(r"\son\w+\s*=|\sstyle\s*=|<style", html)


def references(html: str) -> list[str]:
    """What the page loads: its src and href attributes."""
    return re.findall(r'(?:src|href)="([^"#]+)"', html)


def imports(js: str) -> list[str]:
    return re.findall(r'^import .* from "([^"]+)";$', js, re.M)


def test_every_file_the_page_loads_is_local_and_served(client):
    page = client.get("/").text
    wanted = set(references(page))
    for name in ui.FILES:
        if name.endswith(".js"):
            found = imports((ui.STATIC / name).read_text())
            assert all(ref.startswith("./") for ref in found), f"{name} imports {found}"
            wanted |= {f"/ui/{ref.removeprefix('./')}" for ref in found}
    assert wanted, "the page loads nothing"
    for url in wanted:
        assert url.startswith("/ui/"), f"{url}: the page may load only its own files"
        r = client.get(url)
        assert r.status_code == 200, url
        assert r.headers["content-type"].startswith(ui.FILES[url.removeprefix("/ui/")]), url
        assert "content-security-policy" in r.headers
    # and every shipped file is one the page uses: nothing left over, nothing missing
    assert {f"/ui/{name}" for name in ui.FILES} == wanted
    assert {p.name for p in ui.STATIC.iterdir()} == set(ui.FILES) | {"index.html"}


def test_page_files_name_no_other_site(client):
    for path in ui.STATIC.iterdir():
        text = path.read_text()
        if path.suffix == ".svg":  # an SVG names its XML namespace, which is never fetched
            text = text.replace('xmlns="http://www.w3.org/2000/svg"', "")
        assert not re.search(r"https?://|@import|url\(", text), f"{path.name} reaches outside"


@pytest.mark.parametrize("name", ["nope.js", "..%2Fui.py", "index.html"])
def test_only_the_page_files_are_served(client, name):
    r = client.get(f"/ui/{name}")

    assert r.status_code == 404
    assert r.json()["error"]["message"]  # the server's usual error body, not a file


@pytest.mark.parametrize(
    "host, url",
    [
        ("127.0.0.1", "http://127.0.0.1:8000/"),
        (
            "0.0.0.0",
            "http://127.0.0.1:8000/",
        ),  # every address: this machine's browser uses loopback
        ("::", "http://[::1]:8000/"),
        ("192.168.1.5", "http://192.168.1.5:8000/"),
    ],
)
def test_serve_prints_a_page_url_a_browser_can_open(host, url):
    assert page_url(host, 8000) == url
