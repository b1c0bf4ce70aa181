"""Read a checkpoint's architecture without reading its weights: for the memory plan (which must
run before any weight is read), `llamarun info` and `llamarun doctor MODEL`.

Meta and Hugging Face reuse their loader's own `model_args` (params.json / config.json, and for
Meta the shapes of the memory-mapped shard 0). GGUF reads only the header: gguf.GGUFReader would
also materialise every vocabulary entry and merge (seconds for a 50k vocabulary), and the plan
needs only scalars and tensor shapes. llama2.c reads its 28- or 256-byte header.
"""

from __future__ import annotations

import math
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from ..config import ModelArgs
from ..errors import CheckpointError, ConfigError
from . import LLAMA2C_MAGIC, detect_format, read_json

PACKED_TYPES = ("Q8_0", "Q4_0", "Q4_1")  # GGUF linear weights the loader keeps packed
_GGUF_FLOATS = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


@dataclass
class CheckpointHeader:
    """What a checkpoint is, read from its config or header alone."""

    args: ModelArgs
    format: str  # "meta", "hf", "gguf", "llama2c"
    path: Path
    stored: str  # how most weight bytes are stored: "float32", "bfloat16", "float16", "int8", or a GGUF type
    packed: str | None = None  # GGUF block type the linear weights stay in (Q8_0/Q4_0/Q4_1), if any
    tokenizer: str | None = (
        None  # a description, e.g. "SentencePiece (tokenizer.model, 32000 pieces)"
    )
    name: str | None = None  # the model's own name where the file records one


def read_args(path: str | Path) -> CheckpointHeader:
    """The architecture of the checkpoint at `path`, without reading weights."""
    path = Path(path).expanduser()
    fmt = detect_format(path)
    reader = {"meta": _read_meta, "hf": _read_hf, "gguf": _read_gguf, "llama2c": _read_llama2c}[fmt]
    return reader(path)


def _read_meta(path: Path) -> CheckpointHeader:
    from .meta import find_shards, merged_shapes, model_args, read_shard

    params_path = path / "params.json"
    shards = find_shards(path)
    first = read_shard(shards[0])  # memory-mapped: only the pickle index is read
    args = model_args(
        read_json(params_path), merged_shapes(first, len(shards)), params_path, len(shards)
    )
    stored = _dtype_name(first["tok_embeddings.weight"].dtype)
    # the Meta loader also looks one folder up, where Meta's download puts tokenizer.model
    tokenizer = describe_tokenizer_files(path) or describe_tokenizer_files(path.parent)
    return CheckpointHeader(args, "meta", path, stored, tokenizer=tokenizer)


def _read_hf(path: Path) -> CheckpointHeader:
    from .hf import model_args

    config_path = path / "config.json"
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{config_path} must hold a JSON object; restore it from the original download"
        )
    stored = (
        config.get("torch_dtype") or config.get("dtype") or _safetensors_dtype(path) or "float32"
    )
    name = config.get("_name_or_path") or None
    return CheckpointHeader(
        model_args(config, config_path),
        "hf",
        path,
        str(stored),
        tokenizer=describe_tokenizer_files(path),
        name=name,
    )


def _safetensors_dtype(path: Path) -> str | None:
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        return None
    with safe_open(files[0], framework="pt") as f:
        keys = list(f.keys())
        if not keys:
            return None
        return _GGUF_FLOATS.get(f.get_slice(keys[0]).get_dtype())


def _read_llama2c(path: Path) -> CheckpointHeader:
    # The header is dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len; v1/v2 put
    # the magic and a version before it and a shared-classifier byte after. norm_eps=1e-5 and
    # rope_theta=10000 are not stored: llama2.c's run.c hard-codes them.
    if path.is_dir():  # detect_format accepts a folder holding exactly one llama2.c checkpoint
        from .llama2c import model_files

        path = model_files(path)[0]
    with open(path, "rb") as f:
        head = f.read(256)
    stored = "float32"
    if struct.unpack("<I", head[:4])[0] == LLAMA2C_MAGIC:
        version = struct.unpack("<i", head[4:8])[0]
        dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = struct.unpack(
            "<7i", head[8:36]
        )
        shared = bool(head[36])
        stored = "int8" if version == 2 else "float32"
    else:
        dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = struct.unpack("<7i", head[:28])
        shared, vocab = (
            vocab > 0,
            abs(vocab),
        )  # v0: a negative vocab_size means an untied classifier
    args = _args(
        path,
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=vocab,
        hidden_dim=hidden,
        max_seq_len=seq_len,
        tie_embeddings=shared,
    )
    tokenizer = describe_tokenizer_files(path.parent)
    return CheckpointHeader(args, "llama2c", path, stored, tokenizer=tokenizer)


def _read_gguf(path: Path) -> CheckpointHeader:
    if path.is_dir():
        from . import _head

        path = next(p for p in sorted(path.iterdir()) if p.is_file() and _head(p, 4) == b"GGUF")
    meta, tensors = read_gguf_header(path)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(
            f"{path} holds a {arch!r} model; llamarun runs GGUF files of the 'llama' architecture only"
        )

    from .gguf import model_args

    # the loader's own model_args, given shapes (torch order) instead of tensors
    shapes = {
        "token_embd.weight": "tok_embeddings.weight",
        "blk.0.ffn_gate.weight": "layers.0.feed_forward.w1.weight",
        "output.weight": "output.weight",
    }
    weights = {
        ours: SimpleNamespace(shape=tuple(reversed(tensors[name].dims)))
        for name, ours in shapes.items()
        if name in tensors
    }
    rope_freqs = (
        read_gguf_tensor(path, meta, tensors, "rope_freqs.weight")
        if "rope_freqs.weight" in tensors
        else None
    )
    args = model_args(meta, weights, path, rope_freqs)
    linear_types = Counter(
        t.type for name, t in tensors.items() if len(t.dims) == 2 and name != "token_embd.weight"
    )
    packed = next((t for t, _n in linear_types.most_common() if t in PACKED_TYPES), None)
    by_bytes = Counter()
    for t in tensors.values():
        by_bytes[t.type] += t.size
    stored = _GGUF_FLOATS.get(by_bytes.most_common(1)[0][0], by_bytes.most_common(1)[0][0])
    model = meta.get("tokenizer.ggml.model")
    n_tokens = meta.get("tokenizer.ggml.tokens")
    tokenizer = None
    if model is not None:
        kind = {"llama": "SentencePiece-style", "gpt2": "byte-level BPE"}.get(model, model)
        tokenizer = f"{kind} (in the GGUF file, {n_tokens} tokens)"
    return CheckpointHeader(
        args,
        "gguf",
        path,
        stored,
        packed=packed,
        tokenizer=tokenizer,
        name=meta.get("general.name"),
    )


def _args(path: Path, **fields) -> ModelArgs:
    try:
        return ModelArgs(**fields)
    except ConfigError as e:
        raise CheckpointError(f"{path} describes an impossible architecture: {e}") from e


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# GGUF value types (gguf.GGUFValueType): struct format of the scalars; 8 string, 9 array.
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}


@dataclass(frozen=True)
class GGUFTensor:
    dims: tuple[int, ...]  # GGUF order: innermost (in_features) first
    type: str  # GGML type name, e.g. "F16", "Q4_1"
    size: int  # bytes
    offset: int  # absolute position of the data in the file


def read_gguf_header(path: Path) -> tuple[dict, dict[str, GGUFTensor]]:
    """Metadata (arrays become their length) and the tensors' dims, types, sizes and offsets."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f:

        def read(fmt: str):
            data = f.read(struct.calcsize(fmt))
            if len(data) < struct.calcsize(fmt):
                raise CheckpointError(
                    f"{path} ends inside its GGUF header; the file is truncated, download it again"
                )
            return struct.unpack(fmt, data)[0]

        def string() -> str:
            return f.read(read("<Q")).decode("utf-8", errors="replace")

        def value(vtype: int):
            if vtype == 8:
                return string()
            if vtype == 9:
                item, count = read("<I"), read("<Q")
                if item == 8:
                    for _ in range(count):
                        f.seek(read("<Q"), 1)
                elif item in _SCALARS:
                    f.seek(count * struct.calcsize(_SCALARS[item]), 1)
                else:
                    for _ in range(count):
                        value(item)
                return count
            if vtype not in _SCALARS:
                raise CheckpointError(
                    f"{path} has an unknown GGUF value type {vtype}; the file is corrupt or from a newer GGUF version"
                )
            return read(_SCALARS[vtype])

        if f.read(4) != b"GGUF":
            raise CheckpointError(f"{path} is not a GGUF file (no 'GGUF' magic)")
        version = read("<I")
        if version < 2:
            raise CheckpointError(
                f"{path} is GGUF version {version}; llamarun reads versions 2 and 3: convert it again with a current llama.cpp"
            )
        n_tensors, n_kv = read("<Q"), read("<Q")
        meta = {}
        for _ in range(n_kv):
            name = string()
            meta[name] = value(read("<I"))
        infos = []
        for _ in range(n_tensors):
            name = string()
            dims = tuple(read("<Q") for _ in range(read("<I")))
            qtype = GGMLQuantizationType(read("<I"))
            infos.append((name, dims, qtype, read("<Q")))
        align = int(meta.get("general.alignment", 32))
        data_start = -(-f.tell() // align) * align
    tensors = {}
    for name, dims, qtype, offset in infos:
        block, size = GGML_QUANT_SIZES[qtype]
        tensors[name] = GGUFTensor(
            dims, qtype.name, math.prod(dims) // block * size, data_start + offset
        )
    return meta, tensors


def read_gguf_tensor(
    path: Path, meta: dict, tensors: dict[str, GGUFTensor], name: str
) -> torch.Tensor:
    """One small float32 tensor (e.g. rope_freqs) read from its offset."""
    t = tensors[name]
    if t.type != "F32":
        raise CheckpointError(f"{name} in {path} is {t.type}; expected F32")
    with open(path, "rb") as f:
        f.seek(t.offset)
        data = f.read(t.size)
    return torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(tuple(reversed(t.dims)))


TOKENIZER_KINDS = {
    "hf": "Hugging Face tokenizers",
    "sentencepiece": "SentencePiece",
    "tiktoken": "tiktoken BPE ranks",
    "llama2c": "llama2.c vocabulary",
}


def describe_tokenizer_files(folder: Path) -> str | None:
    """Name the tokenizer file find_tokenizer would prefer in `folder`, judged by contents."""
    from ..tokenizer import tokenizer_files

    if not folder.is_dir():
        return None
    files = tokenizer_files(folder)
    if not files:
        return None
    path, kind = files[0]
    return f"{TOKENIZER_KINDS[kind]} ({path.name})"
