"""Prefix caching and the agent APIs under `llamarun serve` (SmolLM2-135M-Instruct Q4_1, CPU):

1. a ~1,000-token system prompt shared by 8 different questions, sent one after another: the
   time to first token of each (target: each after the first <= 15% of the first);
2. a 10-turn conversation: prompt tokens the engine prefilled in all (from /metrics) against the
   final prompt's length (target <= 1.2x; without prefix caching it is the sum of all turns);
3. load: 32 concurrent streaming clients mixing OpenAI chat and Responses, Anthropic Messages
   and ollama chat (target: 0 failures, the server alive after).

    python benchmarks/prefix_cache.py [MODEL] [--threads N] [--server-args ...]

The server runs in a subprocess; figures come with the load average (the machine may be shared).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import anthropic
import httpx
import ollama
import openai
from prometheus_client.parser import text_string_to_metric_families

HERE = Path(__file__).resolve().parent
MODELS = Path(os.environ.get("LLAMARUN_TEST_MODELS", HERE.parent.parent / "shared" / "models"))
DEFAULT_MODEL = MODELS / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "bench"
QUESTIONS = [
    "What did Tom find on the fence?",
    "Why did Tom's mom not want him to go into the forest?",
    "What name did Tom give the bird, and why?",
    "How did Tom take care of the bird?",
    "What happened when the wing was better?",
    "Describe the forest near Tom's house.",
    "What lesson does the story teach?",
    "Who are the characters in the story?",
]
TURNS = [
    "Hi! I want to plan a small vegetable garden.",
    "What should I plant first in spring?",
    "How often should I water tomatoes?",
    "And what about carrots?",
    "Which plants grow well next to each other?",
    "How do I keep slugs away without chemicals?",
    "What is a good compost mix?",
    "When can I harvest the first lettuce?",
    "How much sun do peppers need?",
    "Thanks! Can you sum up the plan in three lines?",
]


def load_average() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def system_prompt() -> str:
    """About 1,000 tokens: the start of benchmarks/text.txt as a story to answer questions on."""
    story = (HERE / "text.txt").read_text()[:4200]
    return "Answer questions about this story in one or two sentences.\n\n" + story


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "llamarun", "serve", str(args.model), "--port", "0"]
    cmd += ["--model-name", NAME, "--log-level", "warning", "--max-batch-size", str(args.slots)]
    cmd += ["--max-seq-len", str(args.max_seq_len), *args.server_args]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stderr:
        sys.stderr.write(line)
        if found := re.search(r"(http://\S+)/v1", line):
            threading.Thread(
                target=lambda: [sys.stderr.write(x) for x in proc.stderr], daemon=True
            ).start()
            return proc, found.group(1)
    raise SystemExit(f"the server exited with code {proc.wait()} before it printed its URL")


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=60).text
    return sum(
        s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name
    )


def shared_system_prompt(client: openai.OpenAI) -> None:
    system = system_prompt()
    ttfts, cached = [], []
    for question in QUESTIONS:
        t0 = time.perf_counter()
        ttft = None
        stream = client.chat.completions.create(
            model=NAME,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                ttft = time.perf_counter() - t0
            if chunk.usage is not None:
                usage = chunk.usage
        ttfts.append(ttft if ttft is not None else time.perf_counter() - t0)
        cached.append(usage.prompt_tokens_details.cached_tokens)
    first, rest = ttfts[0], ttfts[1:]
    print(
        f"1. shared system prompt ({usage.prompt_tokens} prompt tokens), 8 questions in turn ({load_average()})"
    )
    for i, (t, c) in enumerate(zip(ttfts, cached)):
        print(
            f"   question {i + 1}: ttft {t:6.2f} s  ({t / first:5.1%} of the first)  cached {c} tokens"
        )
    worst = max(rest) / first
    print(
        f"   worst later ttft / first: {worst:.1%} (target <= 15%): {'PASS' if worst <= 0.15 else 'FAIL'}"
    )


def conversation(client: openai.OpenAI, url: str) -> None:
    messages: list[dict] = []
    before = metric(url, "llamarun_prompt_tokens_prefilled_total")
    prompt_sum = 0
    for text in TURNS:
        messages.append({"role": "user", "content": text})
        out = client.chat.completions.create(
            model=NAME, messages=messages, max_tokens=48, temperature=0
        )
        messages.append({"role": "assistant", "content": out.choices[0].message.content})
        prompt_sum += out.usage.prompt_tokens
    prefilled = metric(url, "llamarun_prompt_tokens_prefilled_total") - before
    final = out.usage.prompt_tokens
    ratio = prefilled / final
    print(f"2. 10-turn conversation ({load_average()})")
    print(
        f"   final prompt {final} tokens; prefilled in all {prefilled:.0f} tokens = {ratio:.2f}x the final length"
    )
    print(f"   without prefix caching: {prompt_sum} tokens = {prompt_sum / final:.2f}x")
    print(f"   target <= 1.2x: {'PASS' if ratio <= 1.2 else 'FAIL'}")


async def one_client(i: int, url: str) -> str | None:
    """One streaming request through one of the four APIs; None on success, else the error."""
    question = QUESTIONS[i % len(QUESTIONS)] + f" (client {i})"
    messages = [{"role": "user", "content": question}]
    text = ""
    try:
        if i % 4 == 0:
            async with openai.AsyncOpenAI(
                base_url=url + "/v1", api_key="none", max_retries=0, timeout=900
            ) as c:
                stream = await c.chat.completions.create(
                    model=NAME, messages=messages, max_tokens=32, stream=True
                )
                async for chunk in stream:
                    text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
        elif i % 4 == 1:
            async with openai.AsyncOpenAI(
                base_url=url + "/v1", api_key="none", max_retries=0, timeout=900
            ) as c:
                async with c.responses.stream(
                    model=NAME, input=question, max_output_tokens=32
                ) as stream:
                    text = (await stream.get_final_response()).output_text
        elif i % 4 == 2:
            async with anthropic.AsyncAnthropic(
                base_url=url, api_key="none", max_retries=0, timeout=900
            ) as c:
                async with c.messages.stream(
                    model=NAME, max_tokens=32, messages=messages
                ) as stream:
                    text = "".join([t async for t in stream.text_stream])
        else:
            c = ollama.AsyncClient(host=url, timeout=900)
            async for part in await c.chat(
                model=NAME, messages=messages, stream=True, options={"num_predict": 32}
            ):
                text += part.message.content or ""
    except Exception as e:  # counted as a failure, the run goes on
        return f"client {i}: {type(e).__name__}: {e}"
    return None if text else f"client {i}: empty answer"


async def load(url: str, clients: int) -> None:
    t0 = time.perf_counter()
    errors = [e for e in await asyncio.gather(*(one_client(i, url) for i in range(clients))) if e]
    wall = time.perf_counter() - t0
    alive = httpx.get(url + "/health", timeout=30).json()["status"] == "ok"
    print(
        f"3. load: {clients} concurrent streaming clients, OpenAI chat/Responses, Anthropic, ollama ({load_average()})"
    )
    print(
        f"   completed {clients - len(errors)}  failed {len(errors)}  wall {wall:.1f} s  server alive after: {alive}"
    )
    for e in errors:
        print("   " + e)
    print(f"   target 0 failures and alive: {'PASS' if not errors and alive else 'FAIL'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=str(DEFAULT_MODEL))
    parser.add_argument("--slots", type=int, default=8, help="server slots (--max-batch-size)")
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="the server's torch threads")
    parser.add_argument("--server-args", nargs=argparse.REMAINDER, default=[])
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below
    print(
        f"# llamarun prefix cache benchmark {time.strftime('%Y-%m-%d %H:%M:%S')}, {os.cpu_count()} cores, {load_average()}"
    )
    proc, url = start_server(args)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=900)
        client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        shared_system_prompt(client)
        conversation(client, url)
        asyncio.run(load(url, args.clients))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
