"""Command-line interface: `llamarun COMMAND ...`. Each command is a module with
`add_arguments(parser)` and `run(args) -> int`, imported only when chosen so `--help` is instant."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from ..errors import LlamarunError, RequestError

COMMANDS = {
    "generate": ("llamarun.cli.generate", "complete prompts (several -p run as one batch)"),
    "chat": ("llamarun.cli.chat", "talk to a chat model interactively"),
    "serve": ("llamarun.cli.serve", "OpenAI-compatible HTTP server"),
    "info": ("llamarun.cli.info", "describe a checkpoint without loading its weights"),
    "pull": ("llamarun.cli.pull", "download a model from the catalogue"),
    "list": ("llamarun.cli.ls", "list cached models"),
    "rm": ("llamarun.cli.rm", "remove a cached model"),
    "bench": ("llamarun.cli.bench", "measure prefill/decode speed and memory"),
    "perplexity": ("llamarun.cli.perplexity", "perplexity of a model over a text file"),
    "doctor": ("llamarun.cli.doctor", "check this machine and what fits on it"),
}

DEFAULT_MODEL = "smollm2-135m-instruct"


def add_model_args(parser: argparse.ArgumentParser, *, model_optional: bool = True) -> None:
    """MODEL plus the flags that map to `llamarun.load()`."""
    if model_optional:
        parser.add_argument(
            "model",
            nargs="?",
            default=None,
            metavar="MODEL",
            help=f"checkpoint path or catalogue name (default: {DEFAULT_MODEL})",
        )
    else:
        parser.add_argument("model", metavar="MODEL", help="checkpoint path or catalogue name")
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer file (default: found beside the checkpoint)"
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:N or mps (default: best available)"
    )
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="default: float32 on CPU, bfloat16/float16 on GPU",
    )
    parser.add_argument(
        "--kv-cache-dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="KV cache dtype (default: the model's); float16 halves attention's reads per token",
    )
    parser.add_argument(
        "--quantize",
        default=None,
        choices=["int8", "int4", "auto"],
        help="weight-only quantization after loading; auto: the best quality that fits the device",
    )
    parser.add_argument(
        "--offload",
        action="store_true",
        help="keep the layers that do not fit the GPU on the CPU and run them there (slower)",
    )
    parser.add_argument(
        "--offload-layers",
        type=int,
        default=None,
        metavar="N",
        help="put exactly the last N layers on the CPU",
    )
    parser.add_argument(
        "--max-seq-len", type=int, default=None, help="context length to allocate the KV cache for"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    parser.add_argument(
        "--prefix-cache-mb",
        type=float,
        default=None,
        metavar="MB",
        help="memory for saved prompt prefixes a new prompt reuses instead of prefilling "
        "(default: as large as the KV cache, up to 256; 0 turns prefix caching off)",
    )
    parser.add_argument(
        "--tp",
        type=int,
        default=1,
        metavar="N",
        help="tensor parallelism over N processes of a torchrun job (docs/distributed.md)",
    )
    parser.add_argument(
        "--pp",
        type=int,
        default=1,
        metavar="N",
        help="pipeline parallelism: N stages of contiguous layers (world size = tp x pp)",
    )


def add_speculation_args(parser: argparse.ArgumentParser) -> None:
    """Speculative decoding's flags (load()'s speculate, draft and speculate_k)."""
    parser.add_argument(
        "--speculate",
        default=None,
        choices=["lookup"],
        help="speculative decoding by prompt lookup: propose what followed the last few tokens "
        "earlier in the prompt or the answer (fast on copying tasks; same output)",
    )
    parser.add_argument(
        "--draft",
        default=None,
        metavar="MODEL|int4|int8",
        help="speculative decoding with a draft: a smaller model with the same vocabulary, or "
        "int4/int8 for a quantized copy of the model itself (same output, faster)",
    )
    parser.add_argument(
        "--speculate-k",
        type=int,
        default=None,
        metavar="K",
        help="drafted tokens checked per forward (default: adapted to the acceptance rate)",
    )


def add_sampling_args(parser: argparse.ArgumentParser, *, temperature: float = 0.8) -> None:
    """Flags that map one-to-one to `SamplingParams`."""
    parser.add_argument(
        "-n", "--max-new-tokens", type=int, default=256, help="tokens to generate (default: 256)"
    )
    parser.add_argument(
        "-t",
        "--temperature",
        type=float,
        default=temperature,
        help=f"0 is greedy (default: {temperature})",
    )
    parser.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default: 1)"
    )
    parser.add_argument(
        "--top-k", type=int, default=None, help="sample among the k most likely tokens"
    )
    parser.add_argument(
        "--min-p", type=float, default=0.0, help="drop tokens below min_p * p(best)"
    )
    parser.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default: 1)"
    )
    parser.add_argument("--seed", type=int, default=None, help="makes sampled output reproducible")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    guided = parser.add_argument_group("constrained output (at most one)")
    guided.add_argument(
        "--json-schema",
        metavar="FILE_OR_JSON",
        help="the output is JSON valid against this schema (a file, or the schema inline)",
    )
    guided.add_argument("--json", action="store_true", help="the output is a JSON object")
    guided.add_argument("--regex", metavar="R", help="the whole output matches this regex")
    guided.add_argument(
        "--grammar", metavar="FILE", help="the output follows this grammar file (GBNF or Lark)"
    )


def sampling_params(args: argparse.Namespace):
    from ..sampling import SamplingParams

    schema = args.json_schema
    if schema is not None and args.json:
        raise RequestError("give --json or --json-schema, not both", param="json")
    if schema is not None and not schema.lstrip().startswith("{"):
        schema = _read_flag_file(schema, "json-schema")
    return SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        max_new_tokens=args.max_new_tokens,
        stop=tuple(args.stop),
        seed=args.seed,
        json_schema=schema if schema is not None else args.json,
        regex=args.regex,
        grammar=_read_flag_file(args.grammar, "grammar") if args.grammar else None,
    )


def _read_flag_file(path: str, flag: str) -> str:
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "it is not UTF-8 text"
        raise RequestError(f"cannot read --{flag} {path}: {reason}", param=flag) from e


def resolve_model(name: str | None) -> str:
    """A path stays a path; a catalogue name (or no name: the default) is pulled on first use."""
    name = name or DEFAULT_MODEL
    if Path(name).expanduser().exists():
        return str(Path(name).expanduser())
    from .. import catalogue

    if name in catalogue.CATALOGUE:
        return str(catalogue.pull(name))
    return name  # let the loader report the missing path


def load_from_args(
    args: argparse.Namespace, *, max_batch_size: int = 1, max_seq_len: int | None = None
):
    import llamarun

    llm = llamarun.load(
        resolve_model(args.model),
        tokenizer=args.tokenizer,
        device=args.device,
        dtype=args.dtype,
        quantize=args.quantize,
        max_seq_len=args.max_seq_len or max_seq_len,
        max_batch_size=max_batch_size,
        compile=args.compile,
        offload=args.offload,
        offload_layers=args.offload_layers,
        kv_cache_dtype=args.kv_cache_dtype,
        **({} if args.prefix_cache_mb is None else {"prefix_cache_mb": args.prefix_cache_mb}),
        tp=args.tp,
        pp=args.pp,
        speculate=getattr(args, "speculate", None),
        draft=_draft(getattr(args, "draft", None)),
        speculate_k=getattr(args, "speculate_k", None),
    )
    if llm is None:  # a rank other than 0 has run rank 0's forwards: the output is rank 0's
        raise SystemExit(0)
    return llm


def _draft(name: str | None) -> str | None:
    """--draft: int4/int8 as they are (a quantized copy), else a model like MODEL."""
    from ..speculate import SELF_DRAFTS

    return name if name is None or name in SELF_DRAFTS else resolve_model(name)


def is_follower(args: argparse.Namespace) -> bool:
    """A rank other than 0 of a --tp/--pp job: it runs rank 0's forwards and prints nothing."""
    if getattr(args, "tp", 1) * getattr(args, "pp", 1) == 1:
        return False
    from ..distributed import launch_rank

    return launch_rank() != 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="llamarun", description="Run LLaMA-family models on your own machine."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    modules = {}
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # only the chosen command's module is imported
            modules[name] = importlib.import_module(module)
            modules[name].add_arguments(p)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return modules[args.command].run(args) or 0
    except LlamarunError as e:
        if args.debug:
            raise
        if not is_follower(args):  # every rank of a --tp/--pp job meets the same error
            print(f"llamarun: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
