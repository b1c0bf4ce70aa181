"""`llamarun generate MODEL -p PROMPT [-p PROMPT ...]`: complete prompts; several run as one batch.

Text streams to stdout; a stats line (tokens, prefill and decode tokens/s, load time) to stderr.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import RequestError
from . import (
    add_model_args,
    add_sampling_args,
    add_speculation_args,
    load_from_args,
    sampling_params,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    add_speculation_args(parser)
    parser.add_argument(
        "-p",
        "--prompt",
        action="append",
        default=[],
        help="prompt text (repeatable: several run as one batch)",
    )
    parser.add_argument("--prompt-file", default=None, help="read one more prompt from this file")
    parser.add_argument(
        "--echo",
        action="store_true",
        help="print the prompt before its completion (a batch always shows its prompts)",
    )
    parser.add_argument("--quiet", action="store_true", help="no stats line on stderr")
    add_sampling_args(parser)


def run(args: argparse.Namespace) -> int:
    prompts = list(args.prompt)
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompts.append(f.read())
        except OSError as e:
            raise RequestError(
                f"cannot read --prompt-file {args.prompt_file}: {e.strerror}", param="prompt-file"
            ) from e
    if not prompts:
        raise RequestError(
            "give a prompt with -p TEXT (repeatable) or --prompt-file FILE", param="prompt"
        )
    params = sampling_params(args)
    llm = load_from_args(args, max_batch_size=len(prompts))
    out = sys.stdout
    if len(prompts) == 1:
        if args.echo:
            out.write(prompts[0])
        for piece in llm.stream(prompts[0], params):
            out.write(piece)
            out.flush()
        out.write("\n")
    else:
        # Rows of a batch finish at different times, so each is printed whole, after its prompt.
        for i, result in enumerate(llm.complete_batch(prompts, params)):
            out.write(f"[{i}] {prompts[i]}{result.text}\n")
    out.flush()
    if not args.quiet:
        s = llm.last_stats
        print(
            f"[{s.new_tokens} new tokens, {s.prompt_tokens} prompt tokens; prefill {s.prefill_tps:.1f} tok/s, "
            f"decode {s.decode_tps:.1f} tok/s; load {llm.info.get('load_s', 0):.2f} s"
            + (f", compile {llm.info['compile_s']:.1f} s" if "compile_s" in llm.info else "")
            + _speculation(llm.speculation)
            + "]",
            file=sys.stderr,
        )
    return 0


def _speculation(spec: dict | None) -> str:
    if spec is None:
        return ""
    return (
        f"; speculation {spec['method']}: {100 * spec['acceptance_rate']:.0f}% of "
        f"{spec['proposed']} drafted tokens kept, {spec['tokens_per_forward']:.2f} tokens per forward"
    )
