"""`llamarun perplexity MODEL FILE`: perplexity over a text file, computed as llama.cpp's
llama-perplexity does: the text's tokens cut into non-overlapping chunks of --ctx tokens (the
first token of each replaced by BOS when the tokenizer adds one), the second half of each chunk
scored, perplexity = exp(mean negative log-likelihood). Progress per chunk goes to stderr."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from ..errors import ConfigError
from . import add_model_args, load_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser, model_optional=False)
    parser.add_argument("file", metavar="FILE", help="UTF-8 text file to score")
    parser.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default: 512)")
    parser.add_argument(
        "--max-chunks", type=int, default=None, help="score at most this many chunks"
    )
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


def run(args: argparse.Namespace) -> int:
    if args.ctx < 4:
        raise ConfigError(f"--ctx must be at least 4 tokens, got {args.ctx}")
    path = Path(args.file).expanduser()
    if not path.is_file():
        raise ConfigError(f"{path} is not a file: give the text file to score as FILE")
    text = path.read_text(encoding="utf-8", errors="replace")
    args.max_seq_len = args.max_seq_len or args.ctx
    llm = load_from_args(args, max_seq_len=args.ctx)
    ids = llm.encode(text)
    n_chunks = len(ids) // args.ctx
    if args.max_chunks is not None:
        n_chunks = min(n_chunks, args.max_chunks)
    if n_chunks == 0:
        raise ConfigError(
            f"{path} has {len(ids)} tokens, fewer than one chunk of --ctx {args.ctx}: use a smaller --ctx or a longer file"
        )

    def progress(i: int, nll: float, count: int) -> None:
        print(
            f"[{i + 1}/{n_chunks}] perplexity {math.exp(nll / count):.4f}",
            file=sys.stderr,
            flush=True,
        )

    nll, count, _ = llm.perplexity(ids, args.ctx, max_chunks=args.max_chunks, on_chunk=progress)
    ppl = math.exp(nll / count)
    if args.json:
        print(
            json.dumps(
                {
                    "perplexity": ppl,
                    "chunks": n_chunks,
                    "ctx": args.ctx,
                    "scored_tokens": count,
                    "nll": nll / count,
                }
            )
        )
    else:
        print(
            f"perplexity {ppl:.4f} over {n_chunks} chunks of {args.ctx} tokens ({count} tokens scored)"
        )
    return 0
