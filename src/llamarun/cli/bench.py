"""`llamarun bench MODEL`: prefill and decode speed on random prompts, the bandwidth that decode
speed implies (weight bytes read per step x steps/s) against this machine's measured memory
bandwidth, peak RSS and load time; with --speculate/--draft also the share of drafted tokens
kept and the tokens per forward of the model (random prompts are the hard case for prompt
lookup). Figures go to stdout (`--json`: one JSON object)."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import psutil
import torch

from ..errors import ConfigError
from ..sampling import SamplingParams
from ..speculate import SpeculationStats
from ..weights import weight_bytes_per_step
from . import add_model_args, add_speculation_args, load_from_args

BANDWIDTH_BYTES = 512 << 20  # a tensor far larger than any CPU cache


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    add_speculation_args(parser)
    parser.add_argument(
        "--batch", type=int, default=1, help="sequences decoded together (default: 1)"
    )
    parser.add_argument(
        "--prompt-len", type=int, default=128, help="prompt tokens per sequence (default: 128)"
    )
    parser.add_argument(
        "--gen-len", type=int, default=128, help="new tokens per sequence (default: 128)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompt tokens")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads (default: physical cores)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    for flag in ("batch", "prompt_len", "gen_len"):
        if getattr(args, flag) < 1:
            raise ConfigError(
                f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}"
            )
    llm = load_from_args(
        args, max_batch_size=args.batch, max_seq_len=args.prompt_len + args.gen_len + 1
    )
    report = measure(llm, args.batch, args.prompt_len, args.gen_len, seed=args.seed)
    report["load_s"] = llm.info.get("load_s", 0.0)
    report["peak_rss_mb"] = peak_rss_mb()  # before the bandwidth probe allocates its tensor
    report["memory_bandwidth_gbs"] = memory_bandwidth_gbs(llm.device)
    report["bandwidth_fraction"] = report["decode_gbs"] / report["memory_bandwidth_gbs"]
    report.update(
        model=args.model,
        quantize=llm.info.get("quantize"),
        dtype=llm.info.get("dtype"),
        device=str(llm.device),
        threads=torch.get_num_threads(),
    )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0


def measure(llm, batch: int, prompt_len: int, gen_len: int, *, seed: int = 0) -> dict:
    """Time prefill of `batch` random prompts and the `gen_len - 1` greedy tokens decoded after
    it. An untimed run of the same prompts first warms the kernels, the allocator and the KV cache's
    pages (and the compiled step, if any), as llama-bench's warm-up run does: measured cold, the
    one 256-token prompt of the 15M shape ran at 0.6x its warm speed."""
    engine = llm.engine
    vocab = llm.model.args.vocab_size
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(vocab, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    params = SamplingParams(temperature=0, max_new_tokens=gen_len)
    # EOS must not end a row early: the engine stops only on length here
    stop_ids, engine.stop_ids = engine.stop_ids, frozenset()
    try:
        _run(engine, prompts, SamplingParams(temperature=0, max_new_tokens=4))
        if engine.speculator is not None:  # figures of the measured run only
            engine.speculator.stats = SpeculationStats()
        prefill_s, decode_s, steps, tokens = _run(engine, prompts, params)
    finally:
        engine.stop_ids = stop_ids
    step_bytes = weight_bytes_per_step(llm.model)
    steps_per_s = steps / decode_s if decode_s else 0.0
    # the KV memory the memory bound counts apart from the weights: the cache rows (all written
    # here) and the prefix cache's saved prompt chunks
    kv_bytes = sum(
        buf.nbytes
        for layer in llm.model.layers
        if layer.attention.kv_cache is not None
        for buf in (layer.attention.kv_cache.k, layer.attention.kv_cache.v)
    )
    pool_bytes = engine.prefix.pool.used_bytes if engine.prefix is not None else 0
    speculation = llm.speculation
    return {
        "batch": batch,
        "prompt_len": prompt_len,
        "gen_len": gen_len,
        "prefill_s": prefill_s,
        "prefill_tok_s": batch * prompt_len / prefill_s,
        "decode_s": decode_s,
        "decode_steps": steps,  # forwards of the model
        "decode_tokens": tokens,
        "decode_tok_s": tokens / decode_s if decode_s else 0.0,
        "weight_bytes_per_step": step_bytes,
        "decode_gbs": step_bytes * steps_per_s / 1e9,
        "kv_cache_mb": kv_bytes / 2**20,
        "prefix_cache_mb": pool_bytes / 2**20,
        **({"speculation": speculation} if speculation is not None else {}),
    }


def _run(engine, prompts: list[list[int]], params) -> tuple[float, float, int, int]:
    """(prefill s, decode s, decode steps, tokens decoded)."""
    engine.forget()  # a prefill measured is a prefill done: nothing reused from an earlier run
    t0 = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add(i, prompt, params)
    t1 = time.perf_counter()
    steps = tokens = 0
    while outs := engine.step():
        steps += 1
        tokens += len(outs)
    t2 = time.perf_counter()
    for i in range(len(prompts)):
        engine.release(i)
    return t1 - t0, t2 - t1, steps, tokens


def memory_bandwidth_gbs(device: torch.device, repeats: int = 5) -> float:
    """Read bandwidth: the best of `repeats` sums over a 512 MiB float32 tensor."""
    x = torch.ones(BANDWIDTH_BYTES // 4, device=device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass faults the pages in
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        x.sum().item()
        best = min(best, time.perf_counter() - t0)
    del x
    return BANDWIDTH_BYTES / best / 1e9


def physical_cores() -> int:
    return psutil.cpu_count(logical=False) or torch.get_num_threads()


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (
        peak / (1 << 20) if sys.platform == "darwin" else peak / 1024
    )  # bytes on macOS, KiB on Linux


def print_report(r: dict) -> None:
    print(
        f"model        {r['model']} ({r['dtype']}, quantize={r['quantize']}, {r['device']}, {r['threads']} threads)"
    )
    print(f"load         {r['load_s']:.2f} s")
    print(
        f"prefill      {r['prefill_tok_s']:.1f} tok/s  ({r['batch']} x {r['prompt_len']} tokens in {r['prefill_s']:.2f} s)"
    )
    print(
        f"decode       {r['decode_tok_s']:.1f} tok/s  ({r['decode_tokens']} tokens in {r['decode_steps']} steps, {r['decode_s']:.2f} s)"
    )
    spec = r.get("speculation")
    if spec is not None:
        print(
            f"speculate    {spec['method']}: {100 * spec['acceptance_rate']:.0f}% of {spec['proposed']} drafted tokens kept, "
            f"{spec['tokens_per_forward']:.2f} tokens per forward"
        )
    print(
        f"bandwidth    {r['decode_gbs']:.1f} GB/s = {r['weight_bytes_per_step'] / 1e6:.1f} MB of weights per step; "
        f"{100 * r['bandwidth_fraction']:.0f}% of the {r['memory_bandwidth_gbs']:.1f} GB/s measured"
    )
    print(
        f"peak RSS     {r['peak_rss_mb']:.0f} MB (KV cache {r['kv_cache_mb']:.0f} MB, "
        f"prefix cache {r['prefix_cache_mb']:.0f} MB)"
    )
