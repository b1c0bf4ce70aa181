"""OpenAI-compatible HTTP server: wire types and response builders (protocol.py), continuous
batching on one engine thread (scheduler.py), a request's jobs on it (jobs.py), the OpenAI routes
(openai.py), and create_app assembling them (app.py). Start it with `llamarun serve`."""

from .app import create_app

__all__ = ["create_app"]
