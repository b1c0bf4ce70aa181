"""A tiny server for the server's tests: a random model with a printable-character tokenizer
and a minimal chat format stand in for a real model (the server only needs the Tokenizer
protocol and encode_dialog/stop_ids), served by uvicorn on an ephemeral port in a thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import uvicorn

from llamarun.config import ModelArgs
from llamarun.llm import LLM
from llamarun.model import Transformer
from llamarun.server import create_app

API_KEY = "test-key"
MODEL = "tiny"
BOS, EOS = 256, 257


class CharTokenizer:
    """Ids 0..94 are the printable ASCII characters; every other id prints as one of them too,
    so a random model always produces readable text. 256 is BOS, 257 EOS."""

    vocab_size = 320
    bos_id, eos_id, pad_id = BOS, EOS, -1
    stop_ids = frozenset({EOS})
    add_bos, adds_dummy_prefix = True, False

    def encode(
        self, text: str, *, bos: bool = True, eos: bool = False, special: bool = False
    ) -> list[int]:
        return [BOS] * bos + [ord(c) - 32 for c in text if 32 <= ord(c) < 127] + [EOS] * eos

    def token_bytes(self, token_id: int) -> bytes:
        return b"" if token_id in (BOS, EOS) else bytes([32 + token_id % 95])

    def decode(self, ids) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode()

    def token_to_id(self, piece: str) -> int | None:
        return None


class LineChatFormat:
    """Stand-in for tokenizer.chat's ChatFormat: 'role: content' lines, then 'assistant:'."""

    def __init__(self, tokenizer: CharTokenizer):
        self.tokenizer = tokenizer
        self.stop_ids = frozenset({EOS})

    def encode_dialog(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return self.tokenizer.encode(text + ("assistant:" if add_generation_prompt else ""))


def build_llm(max_batch_size: int = 4, max_seq_len: int = 128) -> LLM:
    torch.manual_seed(0)
    args = ModelArgs(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        hidden_dim=128,
        vocab_size=320,
        max_seq_len=max_seq_len,
    )
    model = Transformer(args)
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.3)
    with torch.no_grad():  # logit 0 for BOS and EOS: greedy text is then always len(max_tokens)
        model.output.weight[[BOS, EOS]] = 0
    model.eval().setup_caches(max_batch_size, max_seq_len)
    llm = LLM(model, CharTokenizer())
    llm.engine.prefill_chunk = 32  # a short context: small chunks, so prompts have whole ones
    return llm


class ServerThread:
    """uvicorn on an ephemeral loopback port, in a background thread."""

    def __init__(self, app):
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@contextmanager
def tiny_server(
    *, api_key: str | None = API_KEY, max_batch_size: int = 4, max_seq_len: int = 128
) -> Iterator[ServerThread]:
    """A running tiny server (its app on `.app`), torch on one thread while it runs: a tiny
    model gains nothing from threads, and they stall on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    llm = build_llm(max_batch_size, max_seq_len)
    app = create_app(
        llm, model_name=MODEL, api_key=api_key, chat_format=LineChatFormat(llm.tokenizer)
    )
    running = ServerThread(app)
    running.app = app
    try:
        yield running
    finally:
        running.stop()
        torch.set_num_threads(threads)
