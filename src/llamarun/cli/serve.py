"""`llamarun serve [MODEL]`: the OpenAI-compatible server (FastAPI + uvicorn) on one loaded model."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from pathlib import Path

from ..errors import ConfigError
from ..tokenizer.chat import get_chat_format
from . import DEFAULT_MODEL, add_model_args, add_speculation_args, is_follower, load_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    add_speculation_args(parser)
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: 127.0.0.1, this machine only)",
    )
    parser.add_argument(
        "--port", type=int, default=8000, help="TCP port (default: 8000; 0 picks a free one)"
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=8,
        help="requests decoded together; more wait in a queue (default: 8)",
    )
    parser.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes"
    )
    parser.add_argument(
        "--model-name", default=None, help="the id clients pass as `model` (default: from MODEL)"
    )
    parser.add_argument(
        "--chat-template",
        default=None,
        metavar="NAME|FILE",
        help="chat format for /v1/chat/completions: llama2, llama3, chatml or a Jinja file (default: the model's own)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="uvicorn's log level",
    )


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, so the URL printed below accepts connections at once."""
    try:
        sock = socket.create_server(
            (host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET
        )
    except OSError as e:
        raise ConfigError(
            f"cannot listen on {host}:{port} ({e.strerror}): pick another --port or --host"
        ) from e
    sock.set_inheritable(True)
    return sock


def _log_to_stderr(level: str) -> None:
    """llamarun's own log (the scheduler's notes, ignored request fields) beside uvicorn's, at
    the same --log-level."""
    logger = logging.getLogger("llamarun")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level.upper())


def page_url(host: str, port: int) -> str:
    """The chat page's address; a browser on this machine reaches a server bound to every
    address through loopback."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ..server import create_app

    _log_to_stderr(args.log_level)
    if args.max_batch_size < 1:
        raise ConfigError(f"--max-batch-size must be at least 1, got {args.max_batch_size}")
    # bound before loading, so a taken port fails at once; with --tp/--pp only rank 0 serves
    sock = None if is_follower(args) else bind(args.host, args.port)
    llm = load_from_args(args, max_batch_size=args.max_batch_size)
    model_name = args.model_name or Path(args.model or DEFAULT_MODEL).stem
    chat_format = None
    if args.chat_template is not None:
        chat_format = get_chat_format(llm.tokenizer, llm.chat_template, args.chat_template)
    app = create_app(llm, model_name=model_name, api_key=args.api_key, chat_format=chat_format)
    server = uvicorn.Server(
        uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=None)
    )
    scheduler = app.state.scheduler
    scheduler.on_fatal = lambda: setattr(server, "should_exit", True)  # uvicorn polls it
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"llamarun: serving {model_name} at http://{shown}:{port}/v1 (batch {args.max_batch_size}, context {llm.max_seq_len})",
        file=sys.stderr,
    )
    print(f"llamarun: chat page at {page_url(host, port)}", file=sys.stderr)
    if "speculate" in llm.info:
        print(
            f"llamarun: speculative decoding: {llm.info['speculate']}, for a request running alone "
            "(with more, all decode plainly)",
            file=sys.stderr,
        )
    server.run(sockets=[sock])
    if scheduler.fatal is not None:  # a rank of a distributed model was lost
        raise scheduler.fatal
    return 0
