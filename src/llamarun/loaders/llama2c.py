"""llama2.c `.bin` checkpoints: the legacy header-only file (run.c, "v0") and export.py's
version 1 (fp32) and version 2 (Q8_0) files with the "ak42" magic.

Layouts (karpathy/llama2.c export.py, run.c, runq.c), little-endian:
- v0: 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len; vocab < 0
  means an unshared classifier), then fp32: tok_embeddings, attention_norm[L], wq[L], wk[L],
  wv[L], wo[L], ffn_norm[L], w1[L], w2[L], w3[L], norm, two RoPE tables of seq_len*head_dim/2
  (skipped: we compute our own), then output when unshared.
- v1: 256-byte header: uint32 magic, int32 version, the 7 int32, uint8 shared_classifier; then
  fp32: attention_norm[L], ffn_norm[L], norm, tok_embeddings, wq[L] ... w3[L], output if unshared.
- v2: v1's header plus int32 group_size right after the shared byte; the norms in fp32 as v1,
  then for each of tok_embeddings, wq[L] ... w3[L] (and output): int8 values, fp32 scales, one
  scale per group of group_size consecutive values. Dequantized to float32 here.

The weights are already in Meta's names' layout: llama2.c's export writes Q/K interleaved.
fp32 tensors are views into a copy-on-write memory map of the file: nothing is read until used.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

from ..config import ModelArgs
from ..errors import CheckpointError
from ..sniff import (
    LLAMA2C_MAGIC,
    LLAMA2C_V1_HEADER_BYTES,
    Llama2cHeader,
    checkpoint_file,
    describe_tokenizer_files,
    llama2c_header,
    llama2c_numels,
    read_head,
    v0_size,
)
from ..tokenizer import find_tokenizer
from ..weights import (
    BLOCK_LINEARS,
    Checkpoint,
    CheckpointHeader,
    block_linear_shapes,
    check_weights,
)


def read_header(path: Path) -> CheckpointHeader:
    """The architecture from the file's 28- or 256-byte header."""
    size = path.stat().st_size
    if size < 28:
        raise CheckpointError(
            f"{path} is truncated: {size} bytes, too short even for a llama2.c header; re-download or re-export it"
        )
    head = read_head(path, LLAMA2C_V1_HEADER_BYTES)
    magic = struct.unpack_from("<I", head)[0] == LLAMA2C_MAGIC
    version = struct.unpack_from("<i", head, 4)[0] if magic else 0
    if version not in (0, 1, 2):
        raise CheckpointError(
            f"{path} is a llama2.c file of version {version}; llamarun reads versions 0, 1 and 2 (re-export it with llama2.c's export.py --version 1)"
        )
    if magic and size < LLAMA2C_V1_HEADER_BYTES:
        raise CheckpointError(
            f"{path} is truncated: {size} bytes, shorter than the {LLAMA2C_V1_HEADER_BYTES}-byte version {version} header"
        )
    header = llama2c_header(head)
    stored = "int8" if header.version == 2 else "float32"
    tokenizer = describe_tokenizer_files(path.parent)
    return CheckpointHeader(
        _args(path, header), "llama2c", path, stored, tokenizer=tokenizer, state=header
    )


def load(source: Path | CheckpointHeader) -> Checkpoint:
    """Memory-map a llama2.c .bin (v0, v1 or v2) into canonical weights, with the tokenizer found
    beside it."""
    header = (
        source
        if isinstance(source, CheckpointHeader)
        else read_header(checkpoint_file(Path(source), "llama2c"))
    )
    path, args, h = header.path, header.args, header.state
    size = path.stat().st_size
    mm = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: writable views, file untouched
    if h.version == 0:
        weights = _read_v0(path, mm, args, size, h)
    elif h.version == 1:
        weights = _read_v1(path, mm, args, size)
    else:
        weights = _read_v2(path, mm, args, size, h.group_size)
    check_weights(args, weights, str(path), source="the llama2.c header")
    tokenizer = find_tokenizer(path.parent, args.vocab_size)
    return Checkpoint(args=args, weights=weights, tokenizer=tokenizer, path=path, format="llama2c")


def _args(path: Path, header: Llama2cHeader) -> ModelArgs:
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = header.fields
    if min(header.fields) <= 0 or dim % n_heads or n_heads % n_kv_heads:
        raise CheckpointError(
            f"{path} has an inconsistent llama2.c header (dim={dim}, hidden_dim={hidden}, n_layers={n_layers}, "
            f"n_heads={n_heads}, n_kv_heads={n_kv_heads}, vocab_size={header.vocab_size}, seq_len={seq_len}): the file is corrupt; re-export it"
        )
    # llama2.c fixes these (run.c: 1e-5f in rmsnorm, 10000.0f in RoPE); the header does not store them.
    try:
        return ModelArgs(
            dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab,
            hidden_dim=hidden, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=seq_len,
            tie_embeddings=header.shared,
        )  # fmt: skip
    except Exception as e:  # ConfigError from ModelArgs validation, with the file named
        raise CheckpointError(f"{path} describes an impossible architecture: {e}") from e


def _check_size(path: Path, size: int, expected: int, what: str) -> None:
    if size != expected:
        problem = "is truncated" if size < expected else "is longer than its header says"
        raise CheckpointError(
            f"{path} {problem}: the {what} header implies {expected} bytes but the file has {size}; re-download or re-export it"
        )


class _Cursor:
    """Reads consecutive fp32 tensors as views of the memory map."""

    def __init__(self, mm: np.memmap, offset: int):
        self.mm, self.offset = mm, offset

    def f32(self, *shape: int) -> torch.Tensor:
        n = int(np.prod(shape))
        view = self.mm[self.offset : self.offset + 4 * n].view(np.float32)
        self.offset += 4 * n
        return torch.from_numpy(view).view(shape)

    def q80(self, group_size: int, *shape: int) -> torch.Tensor:
        n = int(np.prod(shape))
        q = torch.from_numpy(self.mm[self.offset : self.offset + n].view(np.int8))
        scales = np.frombuffer(self.mm, dtype="<f4", count=n // group_size, offset=self.offset + n)
        self.offset += n + 4 * (n // group_size)
        return (q.view(-1, group_size).float() * torch.from_numpy(scales.copy())[:, None]).view(
            shape
        )


def _read_v0(
    path: Path, mm: np.memmap, args: ModelArgs, size: int, header: Llama2cHeader
) -> dict[str, torch.Tensor]:
    L, C = args.n_layers, args.dim
    _check_size(path, size, v0_size(header), "legacy llama2.c (v0)")
    r = _Cursor(mm, 28)
    w = {"tok_embeddings.weight": r.f32(args.vocab_size, C)}
    w |= {f"layers.{i}.attention_norm.weight": r.f32(C) for i in range(L)}
    shapes = block_linear_shapes(args)
    for name in BLOCK_LINEARS[:4]:
        w |= {f"layers.{i}.{name}.weight": r.f32(*shapes[name]) for i in range(L)}
    w |= {f"layers.{i}.ffn_norm.weight": r.f32(C) for i in range(L)}
    for name in BLOCK_LINEARS[4:]:
        w |= {f"layers.{i}.{name}.weight": r.f32(*shapes[name]) for i in range(L)}
    w["norm.weight"] = r.f32(C)
    r.offset += 4 * args.max_seq_len * args.head_dim  # the freq_cis cos/sin tables
    if not args.tie_embeddings:
        w["output.weight"] = r.f32(args.vocab_size, C)
    return w


def _norms(r: _Cursor, args: ModelArgs) -> dict[str, torch.Tensor]:
    L, C = args.n_layers, args.dim
    w = {f"layers.{i}.attention_norm.weight": r.f32(C) for i in range(L)}
    w |= {f"layers.{i}.ffn_norm.weight": r.f32(C) for i in range(L)}
    w["norm.weight"] = r.f32(C)
    return w


def _v1_size(args: ModelArgs, bytes_per_value: float, group_size: int = 0) -> int:
    norms, matrices, classifier = llama2c_numels(
        args.dim, args.hidden_dim, args.n_layers, args.n_heads, args.n_kv_heads, args.vocab_size
    )
    values = matrices + (0 if args.tie_embeddings else classifier)
    scales = values // group_size if group_size else 0
    return LLAMA2C_V1_HEADER_BYTES + 4 * norms + int(bytes_per_value * values) + 4 * scales


def _read_v1(path: Path, mm: np.memmap, args: ModelArgs, size: int) -> dict[str, torch.Tensor]:
    _check_size(path, size, _v1_size(args, 4), "llama2.c version 1")
    r = _Cursor(mm, LLAMA2C_V1_HEADER_BYTES)
    w = _norms(r, args)
    w["tok_embeddings.weight"] = r.f32(args.vocab_size, args.dim)
    shapes = block_linear_shapes(args)
    for name in BLOCK_LINEARS:
        w |= {f"layers.{i}.{name}.weight": r.f32(*shapes[name]) for i in range(args.n_layers)}
    if not args.tie_embeddings:
        w["output.weight"] = r.f32(args.vocab_size, args.dim)
    return w


def _read_v2(
    path: Path, mm: np.memmap, args: ModelArgs, size: int, group_size: int
) -> dict[str, torch.Tensor]:
    shapes = block_linear_shapes(args)
    numels = [args.vocab_size * args.dim] + [o * i for o, i in shapes.values()]
    if group_size <= 0 or any(n % group_size for n in numels):
        raise CheckpointError(
            f"{path} has group_size {group_size} in its llama2.c version 2 header, which does not divide the weight sizes: the file is corrupt; re-export it"
        )
    _check_size(path, size, _v1_size(args, 1, group_size), "llama2.c version 2")
    r = _Cursor(mm, LLAMA2C_V1_HEADER_BYTES)
    w = _norms(r, args)
    w["tok_embeddings.weight"] = r.q80(group_size, args.vocab_size, args.dim)
    for name in BLOCK_LINEARS:
        w |= {
            f"layers.{i}.{name}.weight": r.q80(group_size, *shapes[name])
            for i in range(args.n_layers)
        }
    if not args.tie_embeddings:
        w["output.weight"] = r.q80(group_size, args.vocab_size, args.dim)
    return w
