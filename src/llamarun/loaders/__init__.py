"""Checkpoint loaders: every format becomes one canonical form (Meta names, Meta RoPE layout).

| format          | Q/K layout on disk                                     | action               |
|-----------------|--------------------------------------------------------|----------------------|
| Meta `.pth`     | interleaved (native)                                   | none                 |
| llama2.c `.bin` | interleaved (its export.py undoes HF's permutation)    | none                 |
| GGUF `llama`    | interleaved (llama.cpp's converter undoes HF's)        | none                 |
| HF safetensors  | half-split (`rotate_half`)                             | permute wq and wk    |

Each format module has `read_header(path)` (the architecture from configs or headers alone, for
the memory plan that runs before any weight is read) and `load(header)`, which continues from
that header. The format is detected once, from file contents (sniff.py). Loaders know nothing
about devices or the model class; tensors stay memory-mapped where the format allows.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import TokenizerError
from ..sniff import locate
from ..tokenizer import load_tokenizer
from ..weights import Checkpoint, CheckpointHeader
from . import gguf, hf, llama2c, meta

FORMATS = {"meta": meta, "hf": hf, "gguf": gguf, "llama2c": llama2c}


def read_header(path: str | Path) -> CheckpointHeader:
    """What the checkpoint at `path` is, without reading its weights."""
    fmt, target = locate(path)
    return FORMATS[fmt].read_header(target)


def load_checkpoint(
    source: str | Path | CheckpointHeader,
    tokenizer_path: str | Path | None = None,
    *,
    lazy: bool = False,
) -> Checkpoint:
    """Load any supported checkpoint (a path, or the header read from it); `tokenizer_path`
    overrides the tokenizer found beside it. lazy=True leaves the weights that take work to
    become canonical (Meta shards, HF q/k) as LazyWeight, for a distributed rank that reads
    only its slice; the other formats' weights are memory-mapped views already."""
    header = source if isinstance(source, CheckpointHeader) else read_header(source)
    if lazy and header.format in ("meta", "hf"):
        ckpt = FORMATS[header.format].load(header, lazy=True)
    else:
        ckpt = FORMATS[header.format].load(header)
    if tokenizer_path is not None:
        ckpt.tokenizer = load_tokenizer(tokenizer_path)
    if ckpt.tokenizer is not None and ckpt.tokenizer.vocab_size > ckpt.args.vocab_size:
        raise TokenizerError(
            f"the tokenizer has {ckpt.tokenizer.vocab_size} tokens but the model in {header.path} has "
            f"{ckpt.args.vocab_size}: the tokenizer belongs to another model; pass the right one with --tokenizer"
        )
    return ckpt
