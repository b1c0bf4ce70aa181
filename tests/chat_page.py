"""Helpers for the chat page's browser tests (test_ui_*.py): headless Chromium from Debian's
`chromium` package driven by Playwright, where screenshots go, and the page's common moves.

The browser tests skip, saying why, when /usr/bin/chromium or Playwright is missing; .ci/run
installs both so they run in CI."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "ui"

# As root in a container Chromium needs --no-sandbox; the rest stop its background connections,
# which a machine without internet refuses (and which a test has no use for).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-dev-shm-usage",  # a container's small /dev/shm would crash its renderers
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

PHONE = {"width": 375, "height": 740}
DESKTOP = {"width": 1280, "height": 800}


def need_browser():
    """The Playwright module, or skip the calling test module with the reason."""
    if not CHROMIUM.exists() or shutil.which(str(CHROMIUM)) is None:
        pytest.skip(
            f"{CHROMIUM} not found: install Debian's chromium package (apt-get install -y chromium)",
            allow_module_level=True,
        )
    try:
        from playwright import sync_api
    except ImportError:
        pytest.skip("Playwright is not installed: pip install playwright", allow_module_level=True)
    return sync_api


def launch(playwright):
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def open_settings(page) -> None:
    """At phone width the settings are a drawer behind a button; on a wide screen always shown."""
    toggle = page.locator("#toggle-settings")
    if toggle.is_visible() and toggle.get_attribute("aria-expanded") != "true":
        toggle.click()


def close_panels(page) -> None:
    for name in ("chats", "settings"):
        toggle = page.locator(f"#toggle-{name}")
        if toggle.is_visible() and toggle.get_attribute("aria-expanded") == "true":
            toggle.click()


def set_setting(page, label: str, value: str) -> None:
    open_settings(page)
    page.get_by_label(label, exact=True).fill(value)
    close_panels(page)


def ask(page, text: str) -> None:
    box = page.get_by_label("Message", exact=True)
    box.fill(text)
    box.press("Enter")


def wait_answer(page, timeout: float = 60) -> str:
    """The last answer's text, once it has finished (its stats line appears at the end)."""
    last = page.locator("#messages > article").last
    last.locator(".stats").wait_for(timeout=timeout * 1000)
    return last.locator(".body").inner_text()


def wait_for(condition, timeout: float = 10, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)
    return value
