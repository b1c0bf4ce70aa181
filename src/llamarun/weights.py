"""The canonical form every loader hands over: Meta weight names and shapes, Meta's interleaved
RoPE layout, and the two records a loader returns (a header before any weight is read, then the
checkpoint). A leaf: it knows no file format and no device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import ModelArgs
from .errors import CheckpointError

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

# The linears of one block, in the order llama2.c files store them.
BLOCK_LINEARS = (
    "attention.wq",
    "attention.wk",
    "attention.wv",
    "attention.wo",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
)


def block_linear_shapes(args: ModelArgs) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each linear of one block, by its name in BLOCK_LINEARS."""
    C, F, D = args.dim, args.hidden_dim, args.head_dim
    q, kv = args.n_heads * D, args.n_kv_heads * D
    shapes = ((q, C), (kv, C), (kv, C), (C, q), (F, C), (C, F), (F, C))
    return dict(zip(BLOCK_LINEARS, shapes))


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Canonical weight names and their shapes for `args` (output.weight only when untied)."""
    C, V = args.dim, args.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (V, C), "norm.weight": (C,)}
    if not args.tie_embeddings:
        shapes["output.weight"] = (V, C)
    linears = block_linear_shapes(args)
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes |= {f"{p}{name}.weight": shape for name, shape in linears.items()}
        shapes |= {p + "attention_norm.weight": (C,), p + "ffn_norm.weight": (C,)}
    return shapes


def check_weights(args: ModelArgs, weights: dict, where: str, source: str = "the config") -> None:
    """Raise CheckpointError naming the first missing, unexpected or mis-shaped tensor."""
    shapes = expected_shapes(args)
    missing = [k for k in shapes if k not in weights]
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise CheckpointError(
            f"Missing {len(missing)} weight(s) in {where}: {shown}. The checkpoint may be incomplete (a missing shard or file?)."
        )
    unexpected = [k for k in weights if k not in shapes]
    if unexpected:
        raise CheckpointError(
            f"Unexpected weight(s) in {where}: {', '.join(unexpected[:5])}. Is this a Llama-architecture checkpoint?"
        )
    for name, shape in shapes.items():
        got = tuple(weights[name].shape)
        if got != shape:
            raise CheckpointError(
                f"Shape mismatch for {name} in {where}: file has {got} but {source} implies {shape}. Is the config from a different model?"
            )


@dataclass
class PackedWeight:
    """A matrix kept in a file's quantized block format (a GGUF type of blocks.BLOCK_TYPES), for
    packed.py's layers.

    data: uint8 tensor (rows, bytes_per_row) holding the raw blocks of each row.
    """

    qtype: str
    data: torch.Tensor
    shape: tuple[int, int]  # (out_features, in_features), or (num_embeddings, embedding_dim)


@dataclass(frozen=True)
class StoredTensor:
    """How a checkpoint stores one tensor (from its header): type name, shape, bytes in the file,
    and whether it stays in those bytes in memory (a PackedWeight) or becomes a float tensor."""

    type: str  # "F32", "Q4_K", ...
    shape: tuple[int, ...]
    n_bytes: int
    packed: bool = False


def packed_label(tensors: dict[str, StoredTensor]) -> str | None:
    """The block types a checkpoint's packed matrices are in, most bytes first ("Q5_0+Q8_0"),
    or None when nothing stays packed."""
    by_type: dict[str, int] = {}
    for t in tensors.values():
        if t.packed:
            by_type[t.type] = by_type.get(t.type, 0) + t.n_bytes
    return "+".join(sorted(by_type, key=lambda k: -by_type[k])) or None


@dataclass
class CheckpointHeader:
    """What a checkpoint is, read from its config or header alone (no weights): what the memory
    plan, `llamarun info` and `doctor` need, and what the format's `load` continues from."""

    args: ModelArgs
    format: str  # "meta", "hf", "gguf", "llama2c"
    path: Path  # the folder (Meta, Hugging Face) or the file (GGUF, llama2.c)
    stored: str  # how most weight bytes are stored: "float32", "bfloat16", "int8", a GGUF type...
    packed: str | None = None  # the GGUF block types matrices stay packed in (packed_label)
    tokenizer: str | None = None  # a description, e.g. "SentencePiece (tokenizer.model)"
    name: str | None = None  # the model's own name where the file records one
    tensors: dict[str, StoredTensor] | None = None  # canonical name -> storage (GGUF files)
    state: Any = field(default=None, repr=False)  # what the format's load() reuses (a reader)


@dataclass
class Checkpoint:
    args: ModelArgs
    weights: dict[str, torch.Tensor | PackedWeight]  # canonical names; no output.weight when tied
    tokenizer: Tokenizer | None
    path: Path
    format: str  # "meta", "hf", "gguf", "llama2c"
    chat_template: str | None = None  # Jinja source from the checkpoint's own files
    dtype: torch.dtype = torch.float32  # what the file stores (for float weights)
