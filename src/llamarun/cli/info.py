"""`llamarun info MODEL`: detected format, architecture, parameter count, tokenizer and the memory
needed per dtype and quantization. It reads only the config or header: no weights are loaded.

MODEL is a checkpoint path, a catalogue name (pulled on first use), or a shape from
config.KNOWN_MODELS (e.g. llama-2-7b) to see what such a model would need.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .. import catalogue
from ..config import KNOWN_MODELS, ModelArgs
from ..errors import CheckpointError
from ..loaders import read_header
from ..loaders.gguf import DEQUANTIZED_TYPES
from ..plan import GPU_RESERVE, QUANTIZE_MODES, Option, dtype_name, fmt_gb, option
from ..split import Split, check_split, rank_option, shard_bounds, stage_layers
from ..weights import CheckpointHeader, StoredTensor, packed_block, packed_label
from . import resolve_model

TABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
QUANTIZED_DTYPE = torch.bfloat16  # compute dtype (and scales, KV cache) of the int8/int4 rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="checkpoint path, catalogue name, or a known shape such as llama-2-7b",
    )
    add_memory_args(parser)
    parser.add_argument(
        "--tp",
        type=int,
        default=1,
        metavar="N",
        help="per-rank memory with --tp N (N ranks per stage)",
    )
    parser.add_argument(
        "--pp",
        type=int,
        default=1,
        metavar="N",
        help="per-rank memory with --pp N (N pipeline stages)",
    )


def add_memory_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        help="context to size the KV cache for (default: the model's, capped at 4096)",
    )
    parser.add_argument(
        "--batch", type=int, default=1, help="rows of KV cache (max_batch_size; default: 1)"
    )


def run(args: argparse.Namespace) -> int:
    model_args, header = describe_target(args.model, pull=True)
    seq_len = context_length(model_args, args.max_seq_len)
    for label, value in summary(model_args, header):
        print(f"{label:<14}{value}")
    print()
    stored = header.tensors if header is not None and header.packed else None
    split = Split(args.tp, args.pp)
    if split.is_parallel:
        check_split(model_args, split, block=packed_block(stored))
        print(
            f"Memory per rank with {split.flags()} ({split.world_size} ranks) at {seq_len} tokens of context x {args.batch} row(s); "
            f"each figure is the largest rank's (working memory: CPU; a GPU adds {fmt_gb(GPU_RESERVE)}):"
        )
        rows, largest = rank_rows(model_args, split, args.batch, seq_len, stored=stored)
        print(render_table(rows, {"largest": [f"rank {r}" for r in largest]}))
        print()
        print("\n".join(describe_ranks(model_args, split)))
        return 0
    print(
        f"Memory at {seq_len} tokens of context x {args.batch} row(s) (working memory: CPU; a GPU adds {fmt_gb(GPU_RESERVE)}):"
    )
    rows = memory_rows(model_args, args.batch, seq_len, gpu=False, stored=stored)
    print(render_table(rows))
    if header is not None and header.tensors:
        print()
        print("Stored tensors:")
        print(storage_table(header.tensors))
    return 0


def rank_rows(
    args: ModelArgs,
    split: Split,
    batch: int,
    seq_len: int,
    *,
    stored: dict[str, StoredTensor] | None = None,
) -> tuple[list[Option], list[int]]:
    """memory_rows' options, each as the largest rank's figures, and which rank that is."""
    rows, largest = [], []
    label = packed_label(stored) if stored else None
    for o in memory_rows(args, batch, seq_len, gpu=False, stored=stored):
        table = stored if label is not None and o.quantize == label else None
        ranks = [
            rank_option(
                args, split, r, o.dtype, o.quantize, batch, seq_len, gpu=False, stored=table
            )
            for r in range(split.world_size)
        ]
        worst = max(range(split.world_size), key=lambda r: ranks[r].total)
        rows.append(ranks[worst])
        largest.append(worst)
    return rows, largest


def describe_ranks(args: ModelArgs, split: Split) -> list[str]:
    """What each rank holds: its stage's layers and its share of heads and vocabulary."""
    lines = []
    for rank in range(split.world_size):
        stage, tp_rank = split.stage_of(rank), split.tp_rank_of(rank)
        layers = stage_layers(args.n_layers, split.pp, stage)
        parts = [f"rank {rank}: layers {layers.start}-{layers.stop - 1}"]
        if split.tp > 1:
            start, n = shard_bounds(args.vocab_size, split.tp, tp_rank)
            parts.append(
                f"{args.n_heads // split.tp} of {args.n_heads} heads, "
                f"{args.n_kv_heads // split.tp} of {args.n_kv_heads} key/value heads, "
                f"vocabulary rows {start}-{start + n - 1}"
            )
        if stage == 0:
            parts.append("the embedding")
        if stage == split.pp - 1:
            parts.append("the classifier")
        lines.append(", ".join(parts))
    return lines


def describe_target(name: str | None, *, pull: bool) -> tuple[ModelArgs, CheckpointHeader | None]:
    """(ModelArgs, header) for a path or catalogue name; (ModelArgs, None) for a KNOWN_MODELS shape.
    With pull=False a catalogue model must already be cached (doctor never downloads)."""
    if name is not None and not Path(name).expanduser().exists():
        known = {k.lower(): v for k, v in KNOWN_MODELS.items()}
        if name.lower() in known:
            return known[name.lower()], None
        if not pull:
            cached = catalogue.cached_path(name) if name in catalogue.CATALOGUE else None
            if cached is None:
                raise CheckpointError(
                    f"{name} is neither a checkpoint path, a cached catalogue model, nor a known shape "
                    f"({', '.join(KNOWN_MODELS)}); give a path, or run `llamarun pull {name}` first"
                )
            name = str(cached)
    header = read_header(resolve_model(name) if pull else name)
    return header.args, header


def context_length(args: ModelArgs, max_seq_len: int | None) -> int:
    return max_seq_len or min(args.max_seq_len, 4096)  # llamarun.load's default


def summary(args: ModelArgs, header: CheckpointHeader | None) -> list[tuple[str, str]]:
    rope = f"rope_theta={args.rope_theta:g}"
    if args.rope_scaling is not None:
        s = args.rope_scaling
        rope += f", llama3 scaling x{s.factor:g} from {s.original_max_seq_len}"
    lines = []
    if header is not None:
        lines += [
            (
                "model",
                f"{header.path} ({header.format} format)"
                + (f", named {header.name!r}" if header.name else ""),
            )
        ]
    lines += [
        (
            "architecture",
            f"dim={args.dim} n_layers={args.n_layers} n_heads={args.n_heads} n_kv_heads={args.n_kv_heads} "
            f"head_dim={args.head_dim} hidden_dim={args.hidden_dim} vocab_size={args.vocab_size}",
        ),
        (
            "",
            f"max_seq_len={args.max_seq_len} {rope} norm_eps={args.norm_eps:g}"
            + (" tied embeddings" if args.tie_embeddings else ""),
        ),
        ("parameters", f"{args.n_params():,} ({count_words(args.n_params())})"),
    ]
    if header is not None:
        stored = header.stored + (
            f"; matrices stay packed in their {header.packed} blocks" if header.packed else ""
        )
        lines += [
            ("stored as", stored),
            (
                "tokenizer",
                header.tokenizer or "none found beside the checkpoint (pass --tokenizer)",
            ),
        ]
    return lines


def memory_rows(
    args: ModelArgs,
    batch: int,
    seq_len: int,
    *,
    gpu: bool,
    stored: dict[str, StoredTensor] | None = None,
) -> list[Option]:
    """One option per dtype and per quantization (int8/int4 computing in bfloat16), and for a file
    whose matrices stay packed (`stored`, its tensor table) the way it loads: as stored, computing
    in float32 on a CPU and bfloat16 on a GPU."""
    rows = [option(args, dtype, None, batch, seq_len, gpu=gpu) for dtype in TABLE_DTYPES]
    rows += [option(args, QUANTIZED_DTYPE, q, batch, seq_len, gpu=gpu) for q in QUANTIZE_MODES]
    if stored:
        dtype = QUANTIZED_DTYPE if gpu else torch.float32
        rows.append(
            option(args, dtype, packed_label(stored), batch, seq_len, gpu=gpu, stored=stored)
        )
    return rows


def storage_table(tensors: dict[str, StoredTensor]) -> str:
    """Per stored type: how many tensors, their bytes in the file, and how they are held."""
    by_type: dict[str, list[int]] = {}
    for t in tensors.values():
        count = by_type.setdefault(t.type, [0, 0, 0])
        count[0] += 1
        count[1] += t.n_bytes
        count[2] += t.packed
    lines = []
    for name, (n, size, packed) in sorted(by_type.items(), key=lambda kv: -kv[1][1]):
        held = "kept as stored" if packed == n else "float"
        if name in DEQUANTIZED_TYPES:
            held = "dequantized to float32 at load (no kernel yet)"
        lines.append([name, f"{n}", fmt_gb(size), held])
    header = ["type", "tensors", "bytes", "in memory"]
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(4)]
    return "\n".join(
        "  ".join(
            c.rjust(w) if i in (1, 2) else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))
        ).rstrip()
        for r in [header, *lines]
    )


def row_label(o: Option) -> str:
    return (
        dtype_name(o.dtype)
        if o.quantize is None
        else f"{o.quantize} ({'as stored, ' if o.quantize not in QUANTIZE_MODES else ''}{dtype_name(o.dtype)})"
    )


def render_table(rows: list[Option], extra: dict[str, list[str]] | None = None) -> str:
    """A plain-text table: option, weights, KV cache, working, total, then any extra columns."""
    header = ["option", "weights", "KV cache", "working", "total", *(extra or {})]
    body = [
        [row_label(o), fmt_gb(o.weights), fmt_gb(o.kv_cache), fmt_gb(o.working), fmt_gb(o.total)]
        for o in rows
    ]
    for column in (extra or {}).values():
        for line, cell in zip(body, column):
            line.append(cell)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    return "\n".join([line(header), *(line(r) for r in body)])


def count_words(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.{2 if unit == 'B' else 1}f} {unit}"
    return str(n)
