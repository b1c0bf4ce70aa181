"""OpenAI-compatible HTTP server: wire types (protocol.py) and response builders (builders.py), continuous
batching on one engine thread (scheduler.py), a request's jobs on it (jobs.py), the OpenAI routes
(openai.py), and create_app assembling them (app.py). Start it with `llamarun serve`."""

from .app import create_app

__all__ = ["create_app"]
