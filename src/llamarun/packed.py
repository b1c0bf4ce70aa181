"""Weights that stay in a GGUF file's own blocks: PackedLinear and PackedEmbedding.

build.py puts them in place of nn.Linear / nn.Embedding (as quantize.py's layers replace
nn.Linear), so the model file knows nothing of formats. Each holds its matrix as the file's raw
block rows, a uint8 view of the memory-mapped file: no copy, and only the pages read are
resident. On x86 CPUs the C++ kernels compute on those bytes for one token per row, however
many rows (csrc/matmul_gguf.cpp: 16-bit activations, or two 8-bit levels for Q2_K, Q3_K, Q5_K and
Q6_K with one scale per 32, or on AVX2 alone per 256; one reduction order for every batch size);
a prompt's tokens meet panels of 32 weight rows unpacked once into bytes, in an integer GEMM
(csrc/gemm_gguf.cpp: AVX-512 VNNI, or AVX2's 16-bit products; cpu_kernels.PROMPT), and everything
else (no kernels, autograd, PROMPT float32 or bfloat16) multiplies float32 tiles of
cpu_kernels.TILE_BYTES of rows dequantized at a time (by the kernels, or blocks.py's torch
reference). An embedding dequantizes only the rows it looks up; a classifier tied to it reads
the same bytes.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels
from .blocks import BLOCK_SIZES, TYPE_IDS, dequantize_rows, row_bytes
from .errors import ConfigError
from .weights import PackedWeight


def _check(qtype: str, data: torch.Tensor, shape: tuple[int, int]) -> None:
    if qtype not in BLOCK_SIZES:
        raise ConfigError(
            f"GGUF type {qtype} has no packed layer; packed types: {', '.join(BLOCK_SIZES)}"
        )
    rows, cols = shape
    size = BLOCK_SIZES[qtype][0]
    if (
        cols % size
        or data.dtype != torch.uint8
        or tuple(data.shape) != (rows, row_bytes(qtype, cols))
    ):
        raise ConfigError(
            f"packed {qtype} weight of shape {shape} needs uint8 rows of {row_bytes(qtype, cols)} "
            f"bytes ({cols // size} blocks of {BLOCK_SIZES[qtype][1]}), got {tuple(data.shape)}"
        )


def packed_bytes(qtype: str, shape: tuple[int, int]) -> int:
    """Bytes a packed matrix holds: its file bytes (on a GPU, see transcode.transcoded_bytes)."""
    rows, cols = shape
    return rows * row_bytes(qtype, cols)


def _kernels(x: torch.Tensor, data: torch.Tensor):
    return cpu_kernels.ops() if x.device.type == "cpu" and data.device.type == "cpu" else None


class PackedLinear(nn.Module):
    """y = x @ W.T with W (out_features, in_features) in GGUF blocks of `qtype`: data (out_features,
    bytes per row) uint8, the file's own bytes."""

    def __init__(self, qtype: str, in_features: int, out_features: int, data: torch.Tensor):
        super().__init__()
        _check(qtype, data, (out_features, in_features))
        self.qtype, self.in_features, self.out_features = qtype, in_features, out_features
        self.register_buffer("data", data)

    @classmethod
    def from_packed(cls, packed: PackedWeight) -> PackedLinear:
        out_features, in_features = packed.shape
        # a tensor-parallel share of columns is a strided view of the rows: the kernels read
        # contiguous rows, so that share is copied out (whole matrices stay the file's bytes)
        return cls(packed.qtype, in_features, out_features, packed.data.contiguous())

    def dequantize(self, rows: slice = slice(None)) -> torch.Tensor:
        """float32 (rows, in_features) of the weight's `rows` (all by default)."""
        ops = _kernels(self.data, self.data)
        if ops is None:
            return dequantize_rows(self.data[rows], self.qtype, self.in_features)
        ids = torch.arange(self.out_features)[rows]
        return ops.gguf_rows(self.data, TYPE_IDS[self.qtype], self.in_features, ids)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = _kernels(x, self.data)
        prompt = x.dim() == 3 and x.shape[1] > 1
        if ops is not None and not prompt:
            return ops.gguf_linear(x, self.data, TYPE_IDS[self.qtype], self.in_features)
        # A prompt's tokens: the 8-bit integer GEMM (each weight panel unpacked once for all the
        # prompt's rows, cpu_kernels.PROMPT), else (and for every product where the kernels are
        # not built, or autograd records) float32 on dequantized tiles of rows through torch's
        # GEMM, the float32 reference itself. One token per row, however many rows, always takes
        # the one-token kernel (batch invariance): which path runs depends on the prompt's
        # length, never on the batch beside it.
        K = self.in_features
        levels = cpu_kernels.prompt_levels(x) if ops is not None else 0
        if levels:
            return ops.gguf_prompt_linear(x, self.data, TYPE_IDS[self.qtype], K, levels)
        if ops is not None and x.dtype == torch.float32:
            fill = partial(ops.gguf_rows_into, self.data, TYPE_IDS[self.qtype], K)
            return cpu_kernels.tiled_linear(x, self.out_features, K, fill, K)
        step = max(1, cpu_kernels.TILE_BYTES // (4 * K))
        parts = [
            F.linear(x, self.dequantize(slice(i, i + step)).to(x.dtype))
            for i in range(0, self.out_features, step)
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}"
        )


class PackedEmbedding(nn.Module):
    """An embedding table in GGUF blocks: looks up rows of data (num_embeddings, bytes per row)
    and dequantizes only those, to `dtype`."""

    def __init__(
        self,
        qtype: str,
        num_embeddings: int,
        embedding_dim: int,
        data: torch.Tensor,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        _check(qtype, data, (num_embeddings, embedding_dim))
        self.qtype, self.num_embeddings, self.embedding_dim = qtype, num_embeddings, embedding_dim
        self.dtype = dtype
        self.register_buffer("data", data)

    @classmethod
    def from_packed(cls, packed: PackedWeight, dtype: torch.dtype) -> PackedEmbedding:
        num_embeddings, embedding_dim = packed.shape
        return cls(packed.qtype, num_embeddings, embedding_dim, packed.data, dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        ops = _kernels(tokens, self.data)
        if ops is not None:
            rows = ops.gguf_rows(self.data, TYPE_IDS[self.qtype], self.embedding_dim, tokens)
        else:
            flat = dequantize_rows(self.data[tokens.reshape(-1)], self.qtype, self.embedding_dim)
            rows = flat.view(*tokens.shape, self.embedding_dim)
        return rows.to(self.dtype)

    def tied_linear(self) -> PackedLinear:
        """The classifier that shares this table (tied embeddings): the same bytes."""
        return PackedLinear(self.qtype, self.embedding_dim, self.num_embeddings, self.data)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype}"
