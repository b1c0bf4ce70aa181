"""The chat page at GET /: plain HTML, CSS and JavaScript from static/ (no build step, nothing
fetched from elsewhere), sent with a strict Content-Security-Policy. The page talks to this
server's own /v1 routes, so it is also a worked example of the streaming API."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from .http_errors import APIError

STATIC = Path(__file__).with_name("static")

# Only the page's own files, named here, can be fetched: no path from the URL reaches the disk.
FILES = {
    "style.css": "text/css",
    "chat.css": "text/css",
    "markdown.js": "text/javascript",
    "api.js": "text/javascript",
    "store.js": "text/javascript",
    "settings.js": "text/javascript",
    "panels.js": "text/javascript",
    "view.js": "text/javascript",
    "app.js": "text/javascript",
    "icon.svg": "image/svg+xml",
}

# No inline script or style and no eval: an answer's text that slipped past the escaping still
# could not run. connect-src 'self' keeps the page talking to this server only.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # a restarted server with a newer page is picked up at once
}

router = APIRouter()


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=HEADERS)


@router.api_route("/ui/{name}", methods=["GET", "HEAD"], include_in_schema=False)
async def asset(name: str) -> FileResponse:
    if name not in FILES:
        raise APIError(404, f"the chat page has no file named '{name}'")
    return FileResponse(STATIC / name, media_type=FILES[name], headers=HEADERS)
