"""Constrained decoding overhead: decode tokens/s with a JSON schema against without, on the real
SmolLM2-135M-Instruct Q4_1 on CPU, at batch 1 and batch 8, and the compile time of a typical
schema (16 properties: nested objects, enums, arrays).

    python benchmarks/guided.py [--rounds 5] [--tokens 64] [--threads N]

Targets (issue 13): JSON-schema decode >= 90% of free decode at batch 1 and 8; compile < 50 ms.
Every decode run is the same greedy steps over the same prompts: free rows with their stop ids
off, constrained rows held by a schema (an array with minItems 1000) that cannot finish within
the budget, so both decode exactly --tokens steps. Modes alternate within each round, and the
figures are medians; the machine may be shared, so the load average is printed before and after.
"worker masks" computes each step's masks on a thread while the forward pass runs, "inline
masks" before it, to show what the overlap buys.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import llamarun
from llamarun.guided import make_guide
from llamarun.guided.llg import compile_guide, grammar_of
from llamarun.guided.vocab import build_lltokenizer
from llamarun.sampling import SamplingParams

HERE = Path(__file__).resolve().parent
MODELS = Path(os.environ.get("LLAMARUN_TEST_MODELS", HERE.parent.parent / "shared" / "models"))
SMOLLM2 = MODELS / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "Here is the inventory of the shop as JSON:"
MODES = ("free", "json, worker masks", "json, inline masks")


def typical_schema(tag: int = 0) -> dict:
    """16 properties, two nested objects, enums and arrays (tag makes each one a new schema)."""
    address = {
        "type": "object",
        "properties": {
            "street": {"type": "string"},
            "city": {"type": "string"},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            "country": {"enum": ["FR", "DE", "IT", "ES", "US"]},
        },
        "required": ["street", "city", "country"],
    }
    return {
        "type": "object",
        "properties": {
            f"id_{tag}": {"type": "integer", "minimum": 0},
            "name": {"type": "string", "maxLength": 40},
            "kind": {"enum": ["book", "toy", "food", "tool"]},
            "price": {"type": "number", "minimum": 0},
            "in_stock": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
            "sizes": {"type": "array", "items": {"enum": ["S", "M", "L", "XL"]}},
            "rating": {"type": "integer", "minimum": 1, "maximum": 5},
            "supplier": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "address": address},
                "required": ["name"],
            },
            "notes": {"type": "string"},
        },
        "required": [f"id_{tag}", "name", "kind", "price", "in_stock"],
    }


LONG_SCHEMA = {  # an inventory the budget cannot finish: every row decodes every step
    "type": "object",
    "properties": {"items": {"type": "array", "items": typical_schema(), "minItems": 1000}},
    "required": ["items"],
}


def decode_tps(llm, batch: int, params: SamplingParams, tokens: int) -> tuple[float, float]:
    """Tokens/s of `tokens` decode steps of `batch` rows, prefill excluded, and the CPU time
    (all threads) per token in ms: on a shared machine the first moves with the neighbours'
    load, the second much less."""
    engine = llm.engine
    prompt = llm.encode(PROMPT)
    for slot in range(batch):
        engine.add(slot, prompt, params)
    start, cpu = time.perf_counter(), time.process_time()
    for step in range(tokens):
        outs = engine.step()
        assert len(outs) == batch, f"a row ended after {step} steps"
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    for slot in range(batch):
        engine.release(slot)
    return batch * tokens / elapsed, cpu * 1e3 / (batch * tokens)


def run_decode(llm, rounds: int, tokens: int, batches: list[int]) -> dict:
    """(batch, mode) -> median (tokens/s, CPU ms per token)."""
    free = SamplingParams(temperature=0, max_new_tokens=tokens + 1)
    guided = SamplingParams(temperature=0, max_new_tokens=tokens + 1, json_schema=LONG_SCHEMA)
    engine = llm.engine
    stop_ids, engine.stop_ids = engine.stop_ids, frozenset()  # free rows run the whole budget
    threaded = engine.masks.threaded
    runs: dict[tuple[int, str], list[tuple[float, float]]] = {}
    try:
        for batch in batches:
            decode_tps(llm, batch, guided, 4)  # warm up: compiles and caches the grammar
            for r in range(rounds):
                for mode in MODES:
                    engine.masks.threaded = mode == "json, worker masks"
                    tps, cpu_ms = decode_tps(llm, batch, free if mode == "free" else guided, tokens)
                    runs.setdefault((batch, mode), []).append((tps, cpu_ms))
                    load = os.getloadavg()[0]
                    print(f"  round {r}, batch {batch}, {mode}: {tps:.1f} tok/s, "
                          f"{cpu_ms:.2f} CPU ms/token (load {load:.1f})",
                          file=sys.stderr, flush=True)  # fmt: skip
    finally:
        engine.stop_ids, engine.masks.threaded = stop_ids, threaded
    return {
        key: (statistics.median(t for t, _ in v), statistics.median(c for _, c in v))
        for key, v in runs.items()
    }


def run_compile(llm, repeats: int) -> dict:
    """Median ms to turn a new schema into a matcher, and the one-time tokenizer view build."""
    tok, vocab = llm.tokenizer, llm.model.args.vocab_size
    t0 = time.perf_counter()
    build_lltokenizer(tok, vocab)  # uncached: what a tokenizer's first constrained row pays
    view_ms = (time.perf_counter() - t0) * 1e3
    grammar_ms, compile_ms = [], []
    for i in range(repeats):
        guide = make_guide(json_schema=typical_schema(1000 + i))  # new each time: no cache hit
        t0 = time.perf_counter()
        grammar_of(guide)
        t1 = time.perf_counter()
        compile_guide(guide, tok, vocab)
        t2 = time.perf_counter()
        grammar_ms.append((t1 - t0) * 1e3)
        compile_ms.append((t2 - t0) * 1e3)
    return {
        "view_ms": view_ms,
        "grammar_ms": statistics.median(grammar_ms),
        "compile_ms": statistics.median(compile_ms),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64, help="decode steps per run")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--batch", type=int, action="append", help="batch sizes (default: 1, 8)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    before = os.getloadavg()
    llm = llamarun.load(SMOLLM2, device="cpu", max_batch_size=8, max_seq_len=512)
    batches = args.batch or [1, 8]
    decode = run_decode(llm, args.rounds, args.tokens, batches)
    compiled = run_compile(llm, 20)
    after = os.getloadavg()

    print(f"SmolLM2-135M-Instruct Q4_1, CPU, {torch.get_num_threads()} threads, "
          f"{args.tokens} greedy steps, median of {args.rounds} alternating rounds")  # fmt: skip
    print(
        f"load average before {before[0]:.2f} {before[1]:.2f}, after {after[0]:.2f} {after[1]:.2f}"
    )
    for batch in batches:
        free, free_cpu = decode[batch, "free"]
        print(f"batch {batch}: free {free:6.1f} tok/s, {free_cpu:.2f} CPU ms/token")
        for mode in MODES[1:]:
            tps, cpu = decode[batch, mode]
            print(f"         {mode}: {tps:6.1f} tok/s ({tps / free:.2f}x), {cpu:.2f} CPU ms/token "
                  f"({cpu / free_cpu:.2f}x)")  # fmt: skip
    print(
        f"compile of a typical schema (16 properties, nested, enums, arrays): "
        f"{compiled['compile_ms']:.1f} ms median (schema to grammar {compiled['grammar_ms']:.2f} ms); "
        f"tokenizer view, once per tokenizer: {compiled['view_ms']:.0f} ms"
    )
    if args.json:
        flat = {f"batch{b} {m}": {"tok_s": t, "cpu_ms": c} for (b, m), (t, c) in decode.items()}
        print(json.dumps({**flat, **compiled, "load_before": before, "load_after": after}))


if __name__ == "__main__":
    main()
