"""OpenAI-compatible HTTP server: wire types (protocol.py), continuous batching on one engine
thread (scheduler.py) and the FastAPI routes (app.py). Start it with `llamarun serve`."""

from .app import create_app

__all__ = ["create_app"]
