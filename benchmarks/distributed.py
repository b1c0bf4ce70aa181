"""1 process vs 2 ranks (--tp 2, --pp 2) on CPU with gloo, on the stories110M shape (random
weights unless --model is given): prefill and decode tokens/s with their ratios, the collectives'
time per decoded token, and each rank's resident memory against 1/N of the model (+5%).

    python benchmarks/distributed.py [--model PATH] [--threads N]

Each configuration runs in fresh processes (2 ranks via torchrun). Prints a table and one JSON
object per configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

CONFIGS = [  # (label, tp, pp, threads per process (None: --threads), eager)
    ("1 process", 1, 1, None, False),
    ("1 process, 1 thread", 1, 1, 1, False),
    # what each rank runs: the model's forward, not the one-call C++ step of a whole model
    ("1 process, eager, 1 thr", 1, 1, 1, True),
    ("--tp 2, 1 thread each", 2, 1, 1, False),
    ("--pp 2, 1 thread each", 1, 2, 1, False),
]


def write_stories110m(directory: Path) -> Path:
    """A random model of stories110M's shape as a Hugging Face folder (float32 safetensors)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny import write_hf

    from llamarun.config import KNOWN_MODELS
    from llamarun.model import Transformer

    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(KNOWN_MODELS["stories110M"])
    model = model.to_empty(device="cpu")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model.output.weight = model.tok_embeddings.weight
    return write_hf(model.eval(), directory / "stories110M")


def rss() -> int:
    return psutil.Process().memory_info().rss


def peak_rss(pid: int) -> int:
    """A process's peak resident memory so far (Linux VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def weights_held(model: torch.nn.Module) -> int:
    """Bytes of the distinct weight tensors a model holds (not its KV cache or RoPE tables)."""
    seen, total = set(), 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if "kv_cache" in name or name.startswith(("rope_", "slot_ids")):
            continue
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def time_collectives(model_args, tp: int, repeats: int = 300) -> dict:
    """The collectives of one decoded token at batch 1, each timed alone: an all-reduce of (1, 1,
    C) per attention and per feed-forward and one for the embedding, the classifier's gather of
    V/tp logits, and rank 0's command broadcast."""
    import torch.distributed as dist

    def per_call(op, *args, **kwargs) -> float:
        for _ in range(20):
            op(*args, **kwargs)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(repeats):
            op(*args, **kwargs)
        return (time.perf_counter() - t0) / repeats

    h = torch.ones(1, 1, model_args.dim)
    logits = torch.ones(1, -(-model_args.vocab_size // tp))
    pieces = [torch.empty_like(logits) for _ in range(tp)] if dist.get_rank() == 0 else None
    all_reduce = per_call(dist.all_reduce, h)
    gather = per_call(dist.gather, logits, pieces, dst=0)
    broadcast = per_call(dist.broadcast, torch.zeros(64, dtype=torch.int64), 0)
    n_reduce = 2 * model_args.n_layers + 1
    return {
        "all_reduce_us": all_reduce * 1e6,
        "all_reduces_per_token": n_reduce,
        "all_reduce_ms_per_token": n_reduce * all_reduce * 1e3,
        "gather_ms_per_token": gather * 1e3,
        "broadcast_ms_per_token": broadcast * 1e3,
    }


def worker(args: argparse.Namespace) -> None:
    import llamarun
    from llamarun import cpu_kernels
    from llamarun.cli.bench import measure
    from llamarun.llm import LLM

    torch.set_num_threads(args.threads)
    cpu_kernels.ops()  # the extension's memory is not the model's
    out = Path(args.out)
    rank = int(os.environ.get("RANK", 0))
    (out / f"rank{rank}.json").write_text(json.dumps({"pid": os.getpid(), "rss0": rss()}))
    llm = llamarun.load(
        args.model,
        device="cpu",
        max_seq_len=args.prompt_len + args.gen_len + 1,
        tp=args.tp,
        pp=args.pp,
    )
    report = None
    if llm is not None:
        engine_llm = LLM(llm.model, llm.tokenizer) if args.eager else llm
        report = measure(engine_llm, 1, args.prompt_len, args.gen_len)
        report["weights_held_rank0"] = weights_held(llm.model)
        report["model_bytes"] = llm.model.args.n_params() * 4
        n = args.tp * args.pp
        for r in range(n):  # every rank still holds its share: the others are in load()
            start = json.loads((out / f"rank{r}.json").read_text())
            grown = psutil.Process(start["pid"]).memory_info().rss - start["rss0"]
            report[f"rss_growth_rank{r}"] = grown
            report[f"peak_growth_rank{r}"] = peak_rss(start["pid"]) - start["rss0"]
        llm.close()
    if args.tp > 1:  # every rank, now that rank 0 has released the others
        from llamarun.loaders import read_header

        comm = time_collectives(read_header(args.model).args, args.tp)
        report = report | comm if report is not None else None
    if report is not None:
        (out / "report.json").write_text(json.dumps(report))


def run_config(model: Path, tp: int, pp: int, threads: int, eager: bool, args) -> dict:
    with tempfile.TemporaryDirectory() as out:
        worker_args = [
            str(Path(__file__).resolve()), "--worker", "--model", str(model), "--out", out,
            "--tp", str(tp), "--pp", str(pp), "--threads", str(threads),
            "--prompt-len", str(args.prompt_len), "--gen-len", str(args.gen_len),
        ] + (["--eager"] if eager else [])  # fmt: skip
        n = tp * pp
        launcher = [sys.executable] if n == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
            "--master-port", str(29700 + os.getpid() % 200),
        ]  # fmt: skip
        env = os.environ | {"OMP_NUM_THREADS": str(threads)}
        subprocess.run([*launcher, *worker_args], check=True, env=env, stderr=subprocess.DEVNULL)
        return json.loads((Path(out) / "report.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a checkpoint (default: random stories110M)")
    parser.add_argument("--threads", type=int, default=psutil.cpu_count(logical=False) or 1)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=64)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--pp", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--eager", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else write_stories110m(Path(tmp))
        results = []
        for label, tp, pp, threads, eager in CONFIGS:
            r = run_config(model, tp, pp, threads or args.threads, eager, args)
            results.append((label, tp * pp, r))
            print(json.dumps({"config": label, **r}), file=sys.stderr)
    base = results[1][2]  # one process with the ranks' thread count: the same cores per process
    print(f"{'configuration':<24}{'prefill tok/s':>14}{'ratio':>7}{'decode tok/s':>14}{'ratio':>7}")
    for label, _, r in results:
        print(
            f"{label:<24}{r['prefill_tok_s']:>14.1f}{r['prefill_tok_s'] / base['prefill_tok_s']:>7.2f}"
            f"{r['decode_tok_s']:>14.1f}{r['decode_tok_s'] / base['decode_tok_s']:>7.2f}"
        )
    print(f"(ratios against '{results[1][0]}')")
    for label, _, r in results:
        if "all_reduce_us" in r:
            print(
                f"{label}: {r['all_reduces_per_token']} all-reduces of (1, 1, dim) per token, "
                f"{r['all_reduce_us']:.0f} us each = {r['all_reduce_ms_per_token']:.2f} ms/token; "
                f"logits gather {r['gather_ms_per_token']:.2f} ms, batch broadcast {r['broadcast_ms_per_token']:.2f} ms; "
                f"a decode step takes {1e3 / r['decode_tok_s']:.1f} ms"
            )
    one_rss = base["rss_growth_rank0"]
    for label, n, r in results:
        held, model = r["weights_held_rank0"], r["model_bytes"]
        grown = [r[f"rss_growth_rank{i}"] for i in range(n)]
        verdict = "meets" if held <= model / n * 1.05 else "misses"
        print(
            f"{label}: rank 0 holds {held / 1e6:.0f} MB of weights = {100 * held / model:.1f}% of the "
            f"{model / 1e6:.0f} MB model ({verdict} 1/{n} + 5%); resident growth after generating "
            + ", ".join(
                f"rank {i} {g / 1e6:.0f} MB ({g / one_rss:.2f}x one process)"
                for i, g in enumerate(grown)
            )
            + "; peak growth while loading and generating "
            + ", ".join(f"{r[f'peak_growth_rank{i}'] / 1e6:.0f} MB" for i in range(n))
        )


if __name__ == "__main__":
    main()
