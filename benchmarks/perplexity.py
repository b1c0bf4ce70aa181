"""Fidelity of GGUF files run in their own blocks: perplexity on benchmarks/text.txt (ctx 256) by
`llamarun perplexity`, by llama.cpp's `llama-perplexity` on the same file and text, and by
float32 on the file's weights dequantized (the reference both approximate).

    python benchmarks/perplexity.py --llamacpp /tmp/llamacpp/bin [--write-results]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = Path(os.environ.get("LLAMARUN_TEST_MODELS", HERE.parent.parent / "shared" / "models"))
FILES = [
    MODELS / "smollm2-135m-instruct" / f"SmolLM2-135M-Instruct.{q}.gguf" for q in ("Q4_K_M", "Q4_1")
]
TEXT = HERE / "text.txt"


def llamarun_ppl(path: Path, ctx: int) -> float:
    cmd = [sys.executable, "-m", "llamarun", "perplexity", str(path), str(TEXT), "--ctx", str(ctx)]
    out = subprocess.run([*cmd, "--json"], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-1500:])
    return json.loads(out.stdout[out.stdout.index("{") :])["perplexity"]


def llamacpp_ppl(path: Path, ctx: int, threads: int, bin_dir: Path) -> float:
    cmd = [str(bin_dir / "llama-perplexity"), "-m", str(path), "-f", str(TEXT), "-c", str(ctx)]
    out = subprocess.run([*cmd, "-t", str(threads)], capture_output=True, text=True)
    found = re.search(r"Final estimate: PPL = ([\d.]+)", out.stdout + out.stderr)
    if not found:
        raise RuntimeError((out.stdout + out.stderr)[-1500:])
    return float(found.group(1))


def float32_ppl(path: Path, ctx: int) -> float:
    """The same chunks scored in float32 with every tensor dequantized by the loader."""
    import torch

    from llamarun import build_model, prepare
    from llamarun.loaders.gguf import load

    ckpt = load(path, keep_quantized=False)
    model = build_model(ckpt, torch.device("cpu"), torch.float32)
    model.setup_caches(1, ctx)
    llm = prepare(model, ckpt.tokenizer)
    nll, count, _chunks = llm.perplexity(llm.encode(TEXT.read_text()), ctx)
    return math.exp(nll / count)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--llamacpp", type=Path, default=Path("/tmp/llamacpp/bin"))
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="llama-perplexity's threads"
    )
    p.add_argument("--write-results", action="store_true", help="prepend the table to RESULTS.md")
    opts = p.parse_args()
    lines = [
        f"Perplexity on benchmarks/text.txt, ctx {opts.ctx} (`python benchmarks/perplexity.py "
        f"{' '.join(sys.argv[1:])}`):\n",
        "| file | float32, dequantized | llamarun (blocks) | vs float32 | llama-perplexity | vs float32 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for path in FILES:
        if not path.exists():
            continue
        ref = float32_ppl(path, opts.ctx)
        ours = llamarun_ppl(path, opts.ctx)
        theirs = llamacpp_ppl(path, opts.ctx, opts.threads, opts.llamacpp)
        lines.append(
            f"| {path.name} | {ref:.4f} | {ours:.4f} | {100 * (ours / ref - 1):+.2f}% | "
            f"{theirs:.4f} | {100 * (theirs / ref - 1):+.2f}% |"
        )
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if opts.write_results:
        path = HERE / "RESULTS.md"
        title, _, rest = path.read_text().partition("\n")
        path.write_text(f"{title}\n\n{text}\n{rest}")


if __name__ == "__main__":
    main()
