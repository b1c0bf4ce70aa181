"""The canonical form every loader hands over: Meta weight names and shapes, Meta's interleaved
RoPE layout, and the two records a loader returns (a header before any weight is read, then the
checkpoint). A leaf: it knows no file format and no device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from .blocks import BLOCK_SIZES
from .config import ModelArgs
from .errors import CheckpointError, ConfigError

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

    def narrow(self, dim: int, start: int, length: int) -> PackedWeight:
        """Rows (dim 0) or whole blocks of columns (dim 1) of the weight, as a view of the same
        bytes: a block's scales cover all its columns (32, or 256 for the K-quants and IQ4_XS),
        so blocks are never cut (tensor parallelism)."""
        out_features, in_features = self.shape
        if dim == 0:
            return PackedWeight(
                self.qtype, self.data.narrow(0, start, length), (length, in_features)
            )
        size, block_bytes = BLOCK_SIZES[self.qtype]
        if start % size or length % size:
            raise ConfigError(
                f"cannot take columns {start}..{start + length} of a {self.qtype} weight: its blocks "
                f"hold {size} columns each, and a slice must keep whole blocks"
            )
        data = self.data.narrow(1, start // size * block_bytes, length // size * block_bytes)
        return PackedWeight(self.qtype, data, (out_features, length))


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


def packed_block(tensors: dict[str, StoredTensor] | None) -> int | None:
    """The widest block (in columns) of a checkpoint's packed matrices, which a tensor-parallel
    slice of their inputs must not cut; None when nothing stays packed."""
    sizes = [BLOCK_SIZES[t.type][0] for t in (tensors or {}).values() if t.packed]
    return max(sizes, default=None)


class LazyWeight(Protocol):
    """A weight a loader leaves unread because it takes work to become canonical (Meta shards to
    concatenate, Hugging Face q/k rows to permute), from `load(..., lazy=True)`: a distributed
    rank narrows it to its slice, and only that is read and made canonical."""

    @property
    def shape(self) -> torch.Size: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def sources(self) -> list[torch.Tensor]: ...  # the (memory-mapped) tensors it reads

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor: ...


@dataclass
class ShardedWeight:
    """A weight stored in pieces, one per Meta `consolidated.NN.pth` shard, to be concatenated
    along `dim`; the pieces stay memory-mapped, and `narrow` reads only what a slice needs."""

    pieces: list[torch.Tensor]
    dim: int

    @property
    def sources(self) -> list[torch.Tensor]:
        return self.pieces

    @property
    def shape(self) -> torch.Size:
        shape = list(self.pieces[0].shape)
        shape[self.dim] = sum(p.shape[self.dim] for p in self.pieces)
        return torch.Size(shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.pieces[0].dtype

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        """The slice start..start+length along `dim`: along the pieces' own split it is made of
        the pieces it overlaps (a piece itself, uncopied, when it matches one exactly), across
        it of each piece's slice."""
        if dim != self.dim:
            return torch.cat([p.narrow(dim, start, length) for p in self.pieces], self.dim)
        parts, offset = [], 0
        for p in self.pieces:
            size = p.shape[dim]
            lo, hi = max(start, offset), min(start + length, offset + size)
            if lo < hi:
                parts.append(p.narrow(dim, lo - offset, hi - lo))
            offset += size
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


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
    # canonical names; no output.weight when tied; LazyWeight only from load(..., lazy=True)
    weights: dict[str, torch.Tensor | PackedWeight | LazyWeight]
    tokenizer: Tokenizer | None
    path: Path
    format: str  # "meta", "hf", "gguf", "llama2c"
    chat_template: str | None = None  # Jinja source from the checkpoint's own files
    dtype: torch.dtype = torch.float32  # what the file stores (for float weights)


def weight_bytes_per_step(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer except the embedding
    table (one row per token), the KV caches and the RoPE tables; a classifier tied to the
    embedding counts once, as the classifier."""
    skip = {
        id(t)
        for name, t in model.named_buffers()
        if "kv_cache" in name or name.startswith(("rope_", "slot_ids"))
    }
    embedding = _table(model.tok_embeddings)
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in skip or id(t) in seen or t is embedding:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    output = model._modules.get("output")  # a pipeline stage may lack it
    if output is not None and _table(output) is embedding:
        total += embedding.numel() * embedding.element_size()
    return total


def _table(module: torch.nn.Module) -> torch.Tensor | None:
    """The matrix of an embedding or linear: its weight, or the GGUF block bytes of a packed one."""
    weight = getattr(module, "weight", None)
    return weight if weight is not None else getattr(module, "data", None)
