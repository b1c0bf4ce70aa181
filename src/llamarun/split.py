"""How a model splits over ranks, as arithmetic only (no processes, no torch.distributed): which
--tp/--pp sizes a model allows, which layers and which slice of each weight a rank holds, and
each rank's memory figures for the plan and `llamarun info --tp N --pp M`.

Ranks are laid out tensor-parallel first: rank = stage * tp + tp_rank, so the ranks of one
pipeline stage are neighbours (torchrun numbers one machine's processes consecutively, and
tensor parallelism's all-reduce per layer wants the fast links inside a machine).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .config import ModelArgs
from .errors import ConfigError, MemoryPlanError
from .plan import (
    QUANTIZE_MODES,
    Option,
    device_words,
    dtype_bytes,
    fmt_gb,
    kv_cache_bytes,
    layer_bytes,
    linear_bytes,
    tensor_bytes,
    working_bytes,
)
from .weights import StoredTensor, packed_label


@dataclass(frozen=True)
class Split:
    tp: int = 1  # tensor-parallel ranks per pipeline stage
    pp: int = 1  # pipeline stages

    def __post_init__(self) -> None:
        for flag, value in (("--tp", self.tp), ("--pp", self.pp)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{flag} must be a positive integer, got {value!r}")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    @property
    def is_parallel(self) -> bool:
        return self.world_size > 1

    def stage_of(self, rank: int) -> int:
        return rank // self.tp

    def tp_rank_of(self, rank: int) -> int:
        return rank % self.tp

    def rank_at(self, stage: int, tp_rank: int) -> int:
        return stage * self.tp + tp_rank

    def flags(self) -> str:
        return " ".join(f"--{k} {v}" for k, v in (("tp", self.tp), ("pp", self.pp)) if v > 1)


def stage_layers(n_layers: int, pp: int, stage: int) -> range:
    """The contiguous layers of pipeline `stage`: as even as possible, earlier stages one more."""
    base, extra = divmod(n_layers, pp)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (stage < extra))


def shard_size(size: int, tp: int) -> int:
    """Rows per rank of a split that need not be even (the vocabulary): the last rank's share
    may be short, and is padded where ranks exchange equal-sized pieces."""
    return -(-size // tp)


def shard_bounds(size: int, tp: int, tp_rank: int) -> tuple[int, int]:
    """(start, length) of `tp_rank`'s contiguous share of `size` rows."""
    per = shard_size(size, tp)
    start = min(tp_rank * per, size)
    return start, min(per, size - start)


def tp_sizes_that_work(args: ModelArgs, block: int | None = None) -> list[int]:
    """--tp values this model can split into: whole heads and key/value heads per rank, an even
    share of the feed-forward, and with weights packed in blocks of `block` columns (GGUF), a
    whole number of blocks of each row-parallel layer's inputs."""
    q_features = args.n_heads * args.head_dim
    return [
        tp
        for tp in range(1, args.n_kv_heads + 1)
        if args.n_heads % tp == 0
        and args.n_kv_heads % tp == 0
        and args.hidden_dim % tp == 0
        and (
            block is None or (q_features // tp % block == 0 and args.hidden_dim // tp % block == 0)
        )
    ]


def check_split(args: ModelArgs, split: Split, *, block: int | None = None) -> None:
    """ConfigError naming the numbers and the sizes that work when `args` cannot split so; runs on
    the header alone, before any weight is read."""
    works = tp_sizes_that_work(args, block)
    if split.tp not in works:
        sizes = (
            ", ".join(map(str, works[:-1])) + (" or " if len(works) > 1 else "") + str(works[-1])
        )
        shape = (
            f"n_heads={args.n_heads}, n_kv_heads={args.n_kv_heads}, hidden_dim={args.hidden_dim}"
        )
        if args.n_heads % split.tp or args.n_kv_heads % split.tp:
            what = "n_heads" if args.n_heads % split.tp else "n_kv_heads"
            why = f"{what} ({getattr(args, what)}) is not divisible by --tp {split.tp}: each rank holds whole attention heads"
        elif args.hidden_dim % split.tp:
            why = f"hidden_dim ({args.hidden_dim}) is not divisible by --tp {split.tp}"
        else:
            why = f"--tp {split.tp} would cut the packed weights' inputs (n_heads x head_dim = {args.n_heads * args.head_dim}, hidden_dim = {args.hidden_dim}) inside their {block}-column blocks"
        raise ConfigError(f"{why}. --tp can be {sizes} for this model ({shape}).")
    if split.pp > args.n_layers:
        raise ConfigError(
            f"--pp {split.pp} asks for more pipeline stages than the model has layers ({args.n_layers}): "
            f"--pp can be 1 to {args.n_layers}"
        )


def rank_args(args: ModelArgs, split: Split) -> ModelArgs:
    """The shapes one tensor-parallel rank holds, as ModelArgs, for the memory arithmetic only
    (the model itself keeps the whole model's args; tp.py shrinks its modules)."""
    tp = split.tp
    return replace(
        args,
        n_heads=args.n_heads // tp,
        n_kv_heads=args.n_kv_heads // tp,
        hidden_dim=args.hidden_dim // tp,
        vocab_size=shard_size(args.vocab_size, tp),
        head_dim=args.head_dim,
    )


def rank_option(
    args: ModelArgs,
    split: Split,
    rank: int,
    dtype: torch.dtype,
    quantize: str | None,
    batch: int,
    seq_len: int,
    *,
    gpu: bool,
    kv_dtype: torch.dtype | None = None,
    stored: dict[str, StoredTensor] | None = None,
) -> Option:
    """What rank `rank` holds: its layers' shares, the embedding's share on the first stage, the
    classifier's share on the last, the final norm everywhere (pp.py keeps it on every stage),
    and the KV cache of its layers' key/value heads. Working memory counts full-vocabulary
    logits, which the rank that samples gathers. `stored`: the tensor table of a file whose
    matrices stay packed, counted as the rank holds them (stored_rank_bytes)."""
    local = rank_args(args, split)
    stage = split.stage_of(rank)
    layers = stage_layers(args.n_layers, split.pp, stage)
    n_layers = len(layers)
    first, last = stage == 0, stage == split.pp - 1
    b = dtype_bytes(dtype)
    kv = kv_cache_bytes(local, batch, seq_len, kv_dtype or dtype, n_layers)
    full_vocab = replace(local, vocab_size=args.vocab_size)
    working = working_bytes(full_vocab, batch, seq_len, dtype, gpu=gpu, quantize=quantize)
    if stored is not None:
        weights = stored_rank_bytes(stored, args, split, layers, first, last, dtype, gpu=gpu)
        return Option(dtype=dtype, quantize=quantize, weights=weights, kv_cache=kv, working=working)
    weights = n_layers * layer_bytes(local, dtype, quantize, gpu=gpu) + args.dim * b
    embedding = local.vocab_size * args.dim * b
    if first:
        weights += embedding
    if last:
        if quantize in QUANTIZE_MODES:  # quantize_ turns the classifier into int8, tied or not
            weights += linear_bytes(local.vocab_size, args.dim, dtype, "int8")
        elif not args.tie_embeddings:
            weights += linear_bytes(local.vocab_size, args.dim, dtype, quantize)
        elif not first:  # tied, but the embedding lives on another stage: a copy here
            weights += embedding
    return Option(dtype=dtype, quantize=quantize, weights=weights, kv_cache=kv, working=working)


def stored_rank_bytes(
    stored: dict[str, StoredTensor],
    args: ModelArgs,
    split: Split,
    layers: range,
    first: bool,
    last: bool,
    dtype: torch.dtype,
    *,
    gpu: bool,
) -> int:
    """Weight bytes one rank holds of a file's tensors (plan.tensor_bytes): its stage's tensors
    (pp.stage_weights), each matrix a 1/tp share (tp.py splits every matrix by rows or columns),
    and on the last stage a classifier tied to the embedding as the embedding's rows."""
    tied = args.tie_embeddings and "output.weight" not in stored
    total = 0
    for name, t in stored.items():
        if name.startswith("layers."):
            keep = int(name.split(".")[1]) in layers
        else:
            keep = {"tok_embeddings.weight": first, "output.weight": last}.get(name, True)
        if keep:
            size = tensor_bytes(name, t, dtype, gpu=gpu, tied=tied and last)
            total += size // split.tp if len(t.shape) == 2 else size
    if tied and last and not first:
        embedding = stored["tok_embeddings.weight"]
        total += tensor_bytes("output.weight", embedding, dtype, gpu=gpu) // split.tp
    return total


def largest_rank(options: list[Option]) -> Option:
    return max(options, key=lambda o: o.total)


def plan_rank(
    args: ModelArgs,
    split: Split,
    rank: int,
    *,
    device: torch.device,
    dtype: torch.dtype,
    quantize: str | None,
    batch: int,
    seq_len: int,
    free: int,
    sharing: int = 1,
    stored: dict[str, StoredTensor] | None = None,
    kv_dtype: torch.dtype | None = None,
    name: str = "This model",
) -> Option:
    """The option rank `rank` loads with, or MemoryPlanError with the per-rank figures. `free`:
    bytes free on the rank's device, shared by `sharing` ranks (the processes of one machine
    share its RAM); `quantize` "auto" takes the best quality that fits (dtype, int8, int4).
    `stored`: the tensor table of a file whose matrices stay packed, its only option."""
    gpu = device.type != "cpu"
    packed = packed_label(stored) if stored is not None else None
    modes = (packed,) if packed else (None, *QUANTIZE_MODES) if quantize == "auto" else (quantize,)
    share = free // sharing

    def make(q: str | None) -> Option:
        table = stored if q is not None and q == packed else None
        return rank_option(
            args, split, rank, dtype, q, batch, seq_len, gpu=gpu, kv_dtype=kv_dtype, stored=table
        )

    for q in modes:
        o = make(q)
        if o.total <= share:
            return o
    asked = make(modes[0])
    others = [make(q) for q in QUANTIZE_MODES if q != asked.quantize and not packed]
    fitting = [
        f"--quantize {o.quantize} ({fmt_gb(o.total)} per rank)" for o in others if o.total <= share
    ]
    where = device_words(device) + (f", shared by {sharing} ranks," if sharing > 1 else "")
    text = (
        f"{name} split with {split.flags()} needs {fmt_gb(asked.total)} on rank {rank} "
        f"({fmt_gb(asked.weights)} of weights in {asked.label}, {fmt_gb(asked.kv_cache)} of KV cache at "
        f"{seq_len} tokens x {batch} rows, {fmt_gb(asked.working)} working); {where} has {fmt_gb(share)} "
        "free for it."
    )
    text += (
        f" It fits with {' or '.join(fitting)}."
        if fitting
        else " Use more ranks, a shorter --max-seq-len or a smaller model."
    )
    raise MemoryPlanError(text)
