"""Checkpoint loaders: every format becomes one canonical form (Meta names, Meta RoPE layout).

| format          | Q/K layout on disk                                     | action               |
|-----------------|--------------------------------------------------------|----------------------|
| Meta `.pth`     | interleaved (native)                                   | none                 |
| llama2.c `.bin` | interleaved (its export.py undoes HF's permutation)    | none                 |
| GGUF `llama`    | interleaved (llama.cpp's converter undoes HF's)        | none                 |
| HF safetensors  | half-split (`rotate_half`)                             | permute wq and wk    |

The format is detected from file contents, never from names. Loaders know nothing about devices
or the model class; tensors stay memory-mapped where the format allows.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ModelArgs
from ..errors import CheckpointError
from ..tokenizer import Tokenizer


@dataclass
class PackedWeight:
    """A linear weight kept in a file's quantized block format (GGUF Q8_0 / Q4_0 / Q4_1).

    data: uint8 tensor (out_features, bytes_per_row) holding the raw blocks of each row.
    """

    qtype: str
    data: torch.Tensor
    shape: tuple[int, int]  # (out_features, in_features)


@dataclass
class Checkpoint:
    args: ModelArgs
    weights: dict[str, torch.Tensor | PackedWeight]  # canonical names; no output.weight when tied
    tokenizer: Tokenizer | None
    path: Path
    format: str  # "meta", "hf", "gguf", "llama2c"
    chat_template: str | None = None  # Jinja source from the checkpoint's own files
    dtype: torch.dtype = torch.float32  # what the file stores (for float weights)


FORMATS = ("meta", "hf", "gguf", "llama2c")
LLAMA2C_MAGIC = 0x616B3432  # "ak42"


def detect_format(path: str | Path) -> str:
    """Name of the checkpoint format at `path`, judged by contents."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"{path} does not exist: give a checkpoint folder or file (or a catalogue name; see `llamarun list`)"
        )
    if path.is_dir():
        if (path / "params.json").is_file() and any(path.glob("consolidated.*.pth")):
            return "meta"
        if (path / "config.json").is_file() and (
            any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))
        ):
            return "hf"
        ggufs = [p for p in sorted(path.iterdir()) if p.is_file() and _head(p, 4) == b"GGUF"]
        if len(ggufs) == 1:
            return "gguf"
        from .llama2c import model_files

        if len(model_files(path)) == 1:
            return "llama2c"
        raise CheckpointError(
            f"No checkpoint found in {path}: expected params.json with consolidated.*.pth (Meta), "
            "config.json with *.safetensors or pytorch_model*.bin (Hugging Face), a .gguf file, "
            "or a llama2.c .bin file. Point llamarun at the checkpoint folder or file itself."
        )
    head = _head(path, 28)
    if head[:4] == b"GGUF":
        return "gguf"
    if len(head) >= 4 and struct.unpack("<I", head[:4])[0] == LLAMA2C_MAGIC:
        return "llama2c"
    if len(head) == 28 and _llama2c_v0_consistent(path, head):
        return "llama2c"
    if len(head) == 28:  # a llama2.c header with the wrong file size: say so, with both sizes
        from .llama2c import raise_if_v0_mismatch

        raise_if_v0_mismatch(path, head)
    raise CheckpointError(
        f"{path} is not a checkpoint llamarun can read: it is neither GGUF (magic 'GGUF'), nor a "
        "llama2.c .bin (a 7-int header consistent with the file size). For a Meta or Hugging Face "
        "checkpoint, give its folder instead."
    )


def _head(path: Path, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def llama2c_v0_header(head: bytes) -> tuple[int, ...]:
    return struct.unpack("<7i", head[:28])


def _llama2c_v0_consistent(path: Path, head: bytes) -> bool:
    from .llama2c import expected_v0_size

    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = llama2c_v0_header(head)
    if min(dim, hidden, n_layers, n_heads, n_kv_heads, seq_len) <= 0 or vocab == 0:
        return False
    if dim % n_heads or n_heads % n_kv_heads or dim > 1 << 16 or n_layers > 1 << 10:
        return False
    return path.stat().st_size in expected_v0_size(
        dim, hidden, n_layers, n_heads, n_kv_heads, abs(vocab), seq_len
    )


def load_checkpoint(path: str | Path, tokenizer_path: str | Path | None = None) -> Checkpoint:
    """Load any supported checkpoint; `tokenizer_path` overrides the tokenizer found beside it."""
    path = Path(path).expanduser()
    fmt = detect_format(path)
    if fmt == "meta":
        from .meta import load
    elif fmt == "hf":
        from .hf import load
    elif fmt == "gguf":
        from .gguf import load
    else:
        from .llama2c import load
    ckpt = load(path)
    if tokenizer_path is not None:
        from ..tokenizer import load_tokenizer

        ckpt.tokenizer = load_tokenizer(tokenizer_path)
    if ckpt.tokenizer is not None and ckpt.tokenizer.vocab_size > ckpt.args.vocab_size:
        from ..errors import TokenizerError

        raise TokenizerError(
            f"the tokenizer has {ckpt.tokenizer.vocab_size} tokens but the model in {path} has "
            f"{ckpt.args.vocab_size}: the tokenizer belongs to another model; pass the right one with --tokenizer"
        )
    return ckpt


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Canonical weight names and their shapes for `args` (output.weight only when untied)."""
    C, V, F, D = args.dim, args.vocab_size, args.hidden_dim, args.head_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (V, C), "norm.weight": (C,)}
    if not args.tie_embeddings:
        shapes["output.weight"] = (V, C)
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes |= {
            p + "attention.wq.weight": (args.n_heads * D, C),
            p + "attention.wk.weight": (args.n_kv_heads * D, C),
            p + "attention.wv.weight": (args.n_kv_heads * D, C),
            p + "attention.wo.weight": (C, args.n_heads * D),
            p + "feed_forward.w1.weight": (F, C),
            p + "feed_forward.w2.weight": (C, F),
            p + "feed_forward.w3.weight": (F, C),
            p + "attention_norm.weight": (C,),
            p + "ffn_norm.weight": (C,),
        }
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
        w = weights[name]
        got = tuple(w.shape)
        if got != shape:
            raise CheckpointError(
                f"Shape mismatch for {name} in {where}: file has {got} but {source} implies {shape}. Is the config from a different model?"
            )


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{path} is not valid JSON ({e}); restore it from the original checkpoint"
        ) from e
