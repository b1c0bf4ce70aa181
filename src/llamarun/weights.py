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


# GGUF block types whose linear weights are kept in their own bytes (quantize.linear_from_packed).
PACKED_TYPES = ("Q8_0", "Q4_0", "Q4_1")


@dataclass
class PackedWeight:
    """A linear weight kept in a file's quantized block format (GGUF Q8_0 / Q4_0 / Q4_1).

    data: uint8 tensor (out_features, bytes_per_row) holding the raw blocks of each row.
    """

    qtype: str
    data: torch.Tensor
    shape: tuple[int, int]  # (out_features, in_features)


@dataclass
class CheckpointHeader:
    """What a checkpoint is, read from its config or header alone (no weights): what the memory
    plan, `llamarun info` and `doctor` need, and what the format's `load` continues from."""

    args: ModelArgs
    format: str  # "meta", "hf", "gguf", "llama2c"
    path: Path  # the folder (Meta, Hugging Face) or the file (GGUF, llama2.c)
    stored: str  # how most weight bytes are stored: "float32", "bfloat16", "int8", a GGUF type...
    packed: str | None = None  # GGUF block type the linear weights stay in (Q8_0/Q4_0/Q4_1)
    tokenizer: str | None = None  # a description, e.g. "SentencePiece (tokenizer.model)"
    name: str | None = None  # the model's own name where the file records one
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
