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
from . import LLAMA2C_MAGIC, Checkpoint, check_weights

V1_HEADER_BYTES = 256
# Per-layer matrices in the order every llama2.c version writes them: (name, shape).
_MATRICES = (
    "attention.wq",
    "attention.wk",
    "attention.wv",
    "attention.wo",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
)


def _matrix_shapes(args: ModelArgs) -> dict[str, tuple[int, int]]:
    C, F, D = args.dim, args.hidden_dim, args.head_dim
    return {
        "attention.wq": (args.n_heads * D, C),
        "attention.wk": (args.n_kv_heads * D, C),
        "attention.wv": (args.n_kv_heads * D, C),
        "attention.wo": (C, args.n_heads * D),
        "feed_forward.w1": (F, C),
        "feed_forward.w2": (C, F),
        "feed_forward.w3": (F, C),
    }


def _numels(
    dim: int, hidden: int, n_layers: int, n_heads: int, n_kv_heads: int, vocab: int
) -> tuple[int, int, int]:
    """(norm floats, matrix floats without the classifier, classifier floats)."""
    head = dim // n_heads
    norms = 2 * n_layers * dim + dim
    per_layer = dim * (2 * n_heads * head + 2 * n_kv_heads * head) + 3 * dim * hidden
    return norms, vocab * dim + n_layers * per_layer, vocab * dim


def expected_v0_size(
    dim: int, hidden: int, n_layers: int, n_heads: int, n_kv_heads: int, vocab: int, seq_len: int
) -> set[int]:
    """Valid byte sizes of a legacy (v0) file with these header values: {shared classifier, unshared}."""
    norms, matrices, classifier = _numels(dim, hidden, n_layers, n_heads, n_kv_heads, vocab)
    rope = seq_len * (dim // n_heads)  # cos and sin tables, seq_len * head_dim / 2 each
    shared = 28 + 4 * (norms + matrices + rope)
    return {shared, shared + 4 * classifier}


def model_files(directory: Path) -> list[Path]:
    """The llama2.c checkpoints in a folder, recognised by contents (magic or a v0 header that fits
    the file size); tokenizer.bin and other files are not."""
    from . import _head, _llama2c_v0_consistent

    found = []
    for p in sorted(directory.iterdir()):
        if p.is_file() and p.stat().st_size >= 28:
            head = _head(p, 28)
            if struct.unpack_from("<I", head)[0] == LLAMA2C_MAGIC or _llama2c_v0_consistent(
                p, head
            ):
                found.append(p)
    return found


def raise_if_v0_mismatch(path: Path, head: bytes) -> None:
    """For a file whose first 28 bytes read as a plausible legacy llama2.c header but whose size
    does not fit it: raise CheckpointError naming both sizes (a truncated or damaged .bin)."""
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = struct.unpack("<7i", head[:28])
    if min(dim, hidden, n_layers, n_heads, n_kv_heads, seq_len, abs(vocab)) <= 0:
        return
    if (
        dim % n_heads
        or n_heads % n_kv_heads
        or max(dim, hidden, abs(vocab), seq_len) > 1 << 20
        or n_layers > 1 << 10
    ):
        return
    sizes = sorted(
        expected_v0_size(dim, hidden, n_layers, n_heads, n_kv_heads, abs(vocab), seq_len)
    )
    expected = sizes[0] if vocab > 0 else sizes[1]
    _check_size(path, path.stat().st_size, expected, "legacy llama2.c (v0)")


def load(path: Path) -> Checkpoint:
    """Memory-map a llama2.c .bin (v0, v1 or v2; or the one in a folder) into canonical weights,
    with the tokenizer found beside it."""
    path = Path(path)
    if path.is_dir():
        files = model_files(path)
        if len(files) != 1:
            names = ", ".join(p.name for p in files) or "none"
            raise CheckpointError(
                f"{path} holds {len(files)} llama2.c checkpoints ({names}): give the .bin file itself"
            )
        path = files[0]
    size = path.stat().st_size
    if size < 28:
        raise CheckpointError(
            f"{path} is truncated: {size} bytes, too short even for a llama2.c header; re-download or re-export it"
        )
    mm = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: writable views, file untouched
    (magic,) = struct.unpack_from("<I", mm, 0)
    if magic == LLAMA2C_MAGIC:
        (version,) = struct.unpack_from("<i", mm, 4)
        if version not in (1, 2):
            raise CheckpointError(
                f"{path} is a llama2.c file of version {version}; llamarun reads versions 0, 1 and 2 (re-export it with llama2.c's export.py --version 1)"
            )
        if size < V1_HEADER_BYTES:
            raise CheckpointError(
                f"{path} is truncated: {size} bytes, shorter than the {V1_HEADER_BYTES}-byte version {version} header"
            )
        header = struct.unpack_from("<7i", mm, 8)
        shared = bool(mm[36])
        args = _args(path, header, shared)
        if version == 1:
            weights = _read_v1(path, mm, args, size)
        else:
            (group_size,) = struct.unpack_from("<i", mm, 37)
            weights = _read_v2(path, mm, args, size, group_size)
    else:
        header = struct.unpack_from("<7i", mm, 0)
        args = _args(path, header, header[5] > 0)
        weights = _read_v0(path, mm, args, size)
    check_weights(args, weights, str(path), source="the llama2.c header")
    from ..tokenizer import find_tokenizer

    tokenizer = find_tokenizer(path.parent, args.vocab_size)
    return Checkpoint(args=args, weights=weights, tokenizer=tokenizer, path=path, format="llama2c")


def _args(path: Path, header: tuple[int, ...], shared: bool) -> ModelArgs:
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = header
    if (
        min(dim, hidden, n_layers, n_heads, n_kv_heads, seq_len, abs(vocab)) <= 0
        or dim % n_heads
        or n_heads % n_kv_heads
    ):
        raise CheckpointError(
            f"{path} has an inconsistent llama2.c header (dim={dim}, hidden_dim={hidden}, n_layers={n_layers}, "
            f"n_heads={n_heads}, n_kv_heads={n_kv_heads}, vocab_size={vocab}, seq_len={seq_len}): the file is corrupt; re-export it"
        )
    # llama2.c fixes these (run.c: 1e-5f in rmsnorm, 10000.0f in RoPE); the header does not store them.
    return ModelArgs(
        dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=abs(vocab),
        hidden_dim=hidden, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=seq_len, tie_embeddings=shared,
    )  # fmt: skip


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


def _read_v0(path: Path, mm: np.memmap, args: ModelArgs, size: int) -> dict[str, torch.Tensor]:
    L, C = args.n_layers, args.dim
    shared, unshared = sorted(
        expected_v0_size(
            C, args.hidden_dim, L, args.n_heads, args.n_kv_heads, args.vocab_size, args.max_seq_len
        )
    )
    _check_size(path, size, shared if args.tie_embeddings else unshared, "legacy llama2.c (v0)")
    r = _Cursor(mm, 28)
    w = {"tok_embeddings.weight": r.f32(args.vocab_size, C)}
    w |= {f"layers.{i}.attention_norm.weight": r.f32(C) for i in range(L)}
    shapes = _matrix_shapes(args)
    for name in _MATRICES[:4]:
        w |= {f"layers.{i}.{name}.weight": r.f32(*shapes[name]) for i in range(L)}
    w |= {f"layers.{i}.ffn_norm.weight": r.f32(C) for i in range(L)}
    for name in _MATRICES[4:]:
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
    norms, matrices, classifier = _numels(
        args.dim, args.hidden_dim, args.n_layers, args.n_heads, args.n_kv_heads, args.vocab_size
    )
    values = matrices + (0 if args.tie_embeddings else classifier)
    scales = values // group_size if group_size else 0
    return V1_HEADER_BYTES + 4 * norms + int(bytes_per_value * values) + 4 * scales


def _read_v1(path: Path, mm: np.memmap, args: ModelArgs, size: int) -> dict[str, torch.Tensor]:
    _check_size(path, size, _v1_size(args, 4), "llama2.c version 1")
    r = _Cursor(mm, V1_HEADER_BYTES)
    w = _norms(r, args)
    w["tok_embeddings.weight"] = r.f32(args.vocab_size, args.dim)
    shapes = _matrix_shapes(args)
    for name in _MATRICES:
        w |= {f"layers.{i}.{name}.weight": r.f32(*shapes[name]) for i in range(args.n_layers)}
    if not args.tie_embeddings:
        w["output.weight"] = r.f32(args.vocab_size, args.dim)
    return w


def _read_v2(
    path: Path, mm: np.memmap, args: ModelArgs, size: int, group_size: int
) -> dict[str, torch.Tensor]:
    shapes = _matrix_shapes(args)
    numels = [args.vocab_size * args.dim] + [shapes[n][0] * shapes[n][1] for n in _MATRICES]
    if group_size <= 0 or any(n % group_size for n in numels):
        raise CheckpointError(
            f"{path} has group_size {group_size} in its llama2.c version 2 header, which does not divide the weight sizes: the file is corrupt; re-export it"
        )
    _check_size(path, size, _v1_size(args, 1, group_size), "llama2.c version 2")
    r = _Cursor(mm, V1_HEADER_BYTES)
    w = _norms(r, args)
    w["tok_embeddings.weight"] = r.q80(group_size, args.vocab_size, args.dim)
    for name in _MATRICES:
        w |= {
            f"layers.{i}.{name}.weight": r.q80(group_size, *shapes[name])
            for i in range(args.n_layers)
        }
    if not args.tie_embeddings:
        w["output.weight"] = r.q80(group_size, args.vocab_size, args.dim)
    return w
