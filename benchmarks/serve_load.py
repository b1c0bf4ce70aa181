"""Load test for `llamarun serve`: N concurrent streaming chat requests against the same N sent one
at a time. Starts the server in a subprocess on loopback, so client work does not share its cores'
Python interpreter, and prints completed/failed counts, time to first token and tokens/s.

    python benchmarks/serve_load.py [MODEL] [--requests 32] [--max-tokens 64]

Target (issue 6): all requests complete, and concurrent throughput >= 4x one-at-a-time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import openai

DEFAULT_MODEL = (
    Path(__file__).resolve().parents[1]
    / ".."
    / "shared"
    / "models"
    / "smollm2-135m-instruct"
    / "SmolLM2-135M-Instruct.Q4_1.gguf"
)
SUBJECTS = "a lighthouse keeper, a lost robot, a city under the sea, a dragon who bakes bread, a clockmaker, a talking river, a chess prodigy, the last tree on Mars".split(
    ", "
)
ASKS = [
    "Write a short story about {}.",
    "Describe {} in vivid detail.",
    "Write a poem about {}.",
    "Explain to a child what makes {} special.",
]


@dataclass
class Result:
    ok: bool
    ttft_s: float = 0.0  # time to the first content token
    tokens: int = 0
    error: str = ""


def prompts(n: int) -> list[str]:
    return [
        ASKS[i % len(ASKS)].format(SUBJECTS[(i // len(ASKS)) % len(SUBJECTS)]) + f" (#{i})"
        for i in range(n)
    ]


async def one_request(
    client: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int
) -> Result:
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return Result(True, ttft if ttft is not None else time.perf_counter() - t0, tokens)
    except Exception as e:  # counted as failed, the run goes on
        return Result(False, error=f"{type(e).__name__}: {e}")


async def run_phase(
    url: str, model: str, texts: list[str], max_tokens: int, concurrent: bool
) -> tuple[list[Result], float]:
    async with openai.AsyncOpenAI(
        base_url=url, api_key="none", max_retries=0, timeout=600
    ) as client:
        t0 = time.perf_counter()
        if concurrent:
            results = await asyncio.gather(
                *(one_request(client, model, p, max_tokens) for p in texts)
            )
        else:
            results = [await one_request(client, model, p, max_tokens) for p in texts]
        return list(results), time.perf_counter() - t0


def report(name: str, results: list[Result], wall_s: float) -> float:
    done = [r for r in results if r.ok]
    ttfts = sorted(r.ttft_s for r in done) or [float("nan")]
    p95 = ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))]
    tokens = sum(r.tokens for r in done)
    tps = tokens / wall_s
    print(
        f"{name:<12} completed {len(done):>3}  failed {len(results) - len(done):>3}  "
        f"ttft p50 {statistics.median(ttfts):6.2f} s  p95 {p95:6.2f} s  "
        f"tokens {tokens:>5}  wall {wall_s:7.1f} s  aggregate {tps:7.1f} tok/s"
    )
    for r in results:
        if not r.ok:
            print(f"  failed: {r.error}")
    return tps


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    cmd = [
        sys.executable,
        "-m",
        "llamarun",
        "serve",
        str(args.model),
        "--port",
        "0",
        "--log-level",
        "warning",
        "--max-batch-size",
        str(args.max_batch_size),
        "--max-seq-len",
        str(args.max_seq_len),
        "--model-name",
        "bench",
        *args.server_args,
    ]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stderr:
        sys.stderr.write(line)
        if found := re.search(r"http://\S+/v1", line):
            threading.Thread(
                target=lambda: [sys.stderr.write(rest) for rest in proc.stderr], daemon=True
            ).start()
            return proc, found.group(0)
    raise SystemExit(f"the server exited with code {proc.wait()} before it printed its URL")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "model",
        nargs="?",
        default=str(DEFAULT_MODEL.resolve()),
        help="checkpoint (default: SmolLM2-135M-Instruct Q4_1)",
    )
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=32, help="server slots")
    parser.add_argument("--max-seq-len", type=int, default=512, help="server context per slot")
    parser.add_argument(
        "--threads", type=int, default=None, help="the server's torch threads (default: torch's)"
    )
    parser.add_argument(
        "--server-args", nargs=argparse.REMAINDER, default=[], help="passed on to `llamarun serve`"
    )
    args = parser.parse_args()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below
    proc, url = start_server(args)
    try:
        texts = prompts(args.requests)
        asyncio.run(run_phase(url, "bench", texts[:1], 4, concurrent=False))  # warm-up
        print(
            f"{args.requests} streaming chat requests, max_tokens {args.max_tokens}, greedy, {args.max_batch_size} slots"
        )
        concurrent = report(
            "concurrent",
            *asyncio.run(run_phase(url, "bench", texts, args.max_tokens, concurrent=True)),
        )
        sequential = report(
            "one-by-one",
            *asyncio.run(run_phase(url, "bench", texts, args.max_tokens, concurrent=False)),
        )
        print(f"speed-up {concurrent / sequential:.2f}x (target >= 4x)")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
