"""GGUF (llama.cpp) files of the `llama` architecture: metadata -> ModelArgs, tensors -> Meta names.

Reads with gguf-py's memory-mapped GGUFReader. Q/K are already in Meta's interleaved RoPE layout
(llama.cpp's converter undoes HF's permutation), so no tensor is permuted here. Float tensors stay
memory-mapped; quantized ones are dequantized with `gguf.quants.dequantize`, except Q8_0/Q4_0/Q4_1
linear weights, which stay packed (`PackedWeight`) for the quantized linear layers.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from ..config import ModelArgs, RopeScaling
from ..errors import CheckpointError
from . import Checkpoint, PackedWeight, check_weights

SUPPORTED_ARCHITECTURES = ("llama",)
SUPPORTED_VERSIONS = (2, 3)
FLOAT_TYPES = ("F32", "F16", "BF16")
QUANTIZED_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
PACKED_TYPES = ("Q8_0", "Q4_0", "Q4_1")  # kept as raw blocks when keep_quantized=True
SUPPORTED_TYPES = FLOAT_TYPES + QUANTIZED_TYPES

# GGUF tensor name -> canonical (Meta) name; blk.N.* is renamed per layer.
GLOBAL_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
LAYER_NAMES = {
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1",
    "ffn_down": "feed_forward.w2",
    "ffn_up": "feed_forward.w3",
    "attn_norm": "attention_norm",
    "ffn_norm": "ffn_norm",
}
# Precomputed rotary factors: the model computes its own (Llama 3 scaling is read from them below).
DROPPED = ("rope_freqs.weight",)


class MappedReader(gguf.GGUFReader):
    """GGUFReader over a plain ndarray view of its np.memmap (the same mapped bytes): slicing the
    memmap subclass costs an __array_finalize__ per field part, which made parsing SmolLM2's
    vocabulary 3x slower (3.1 s vs 1.1 s here)."""

    @property
    def data(self) -> np.ndarray:
        return self._mapped

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._mapped = value.view(np.ndarray)


def load(path: Path, *, keep_quantized: bool = True) -> Checkpoint:
    """Read a GGUF file; `keep_quantized=False` dequantizes every tensor to float32."""
    from ..tokenizer.gguf import GGUFTokenizer

    path = Path(path)
    if path.is_dir():  # detect_format accepts a folder holding exactly one GGUF file
        found = [p for p in sorted(path.iterdir()) if p.is_file() and _magic(p) == b"GGUF"]
        if len(found) != 1:
            raise CheckpointError(
                f"{path} holds {len(found)} GGUF files: give the .gguf file itself"
            )
        path = found[0]
    reader = open_reader(path)
    meta = read_metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{path} holds a GGUF model of architecture {arch!r}; llamarun supports only "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (Llama 1/2/3, TinyLlama, SmolLM, Mistral-7B and "
            "other llama-architecture exports)."
        )
    tensors = {t.name: t for t in reader.tensors}
    weights: dict[str, torch.Tensor | PackedWeight] = {}
    rope_freqs = None
    for name, t in tensors.items():
        qtype = t.tensor_type.name
        if qtype not in SUPPORTED_TYPES:
            raise CheckpointError(
                f"Unsupported GGUF tensor type {qtype} for {name} in {path}. "
                f"Supported: {', '.join(SUPPORTED_TYPES)}. Re-quantize the model to one of these "
                "(e.g. llama.cpp's llama-quantize ... Q4_K_M)."
            )
        if name in DROPPED:
            rope_freqs = _to_tensor(t)
            continue
        canonical = canonical_name(name, path)
        packable = keep_quantized and qtype in PACKED_TYPES and len(t.shape) == 2
        if packable and canonical != "tok_embeddings.weight":
            rows, cols = int(t.shape[1]), int(t.shape[0])  # GGUF lists dims innermost first
            weights[canonical] = PackedWeight(qtype, _from_numpy(t.data), (rows, cols))
        else:
            weights[canonical] = _to_tensor(t)
    args = model_args(meta, weights, path, rope_freqs)
    check_weights(args, weights, str(path), source="the GGUF metadata")
    matrix_types = {t.tensor_type.name for t in tensors.values() if len(t.shape) == 2}
    stored = {"F16": torch.float16, "BF16": torch.bfloat16}
    dtype = (
        stored[matrix_types.pop()]
        if len(matrix_types) == 1 and matrix_types <= stored.keys()
        else torch.float32
    )
    return Checkpoint(
        args=args,
        weights=weights,
        tokenizer=GGUFTokenizer.from_metadata(meta, path),
        path=path,
        format="gguf",
        chat_template=meta.get("tokenizer.chat_template"),
        dtype=dtype,
    )


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


def open_reader(path: Path):
    """GGUFReader over `path`, with each way a file can be broken turned into one sentence."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] != b"GGUF":
        raise CheckpointError(
            f"{path} is not a GGUF file: it starts with {head[:4]!r}, not the magic b'GGUF'. "
            "The download may be incomplete or the file is another format."
        )
    version = int.from_bytes(head[4:8], "little") if len(head) == 8 else None
    if version not in SUPPORTED_VERSIONS:
        raise CheckpointError(
            f"{path} is GGUF version {version}; llamarun reads versions 2 and 3 "
            "(version 1 files are obsolete: convert the model again with a current llama.cpp)."
        )
    try:
        reader = MappedReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError, MemoryError) as e:
        raise CheckpointError(
            f"{path} is a truncated or corrupt GGUF file ({size} bytes; the reader stopped with: {e}). "
            "Download it again (llamarun rm NAME && llamarun pull NAME for catalogue models)."
        ) from e
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise CheckpointError(
                f"{path} is truncated: tensor {t.name} ends at byte {end} but the file has {size} bytes. "
                "Download it again."
            )
    return reader


def read_metadata(reader) -> dict[str, Any]:
    """All key/value fields as Python values (strings, numbers, lists)."""
    meta = {}
    for key, field in reader.fields.items():
        try:
            meta[key] = field.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise CheckpointError(
                f"metadata field {key} in {reader.data.filename} is corrupt ({e}); download the file again"
            ) from e
    return meta


def canonical_name(name: str, path: Path) -> str:
    base, _, suffix = name.rpartition(".")
    if base in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[base]}.{suffix}"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if m and m.group(2) in LAYER_NAMES:
        return f"layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}.{suffix}"
    raise CheckpointError(
        f"Unexpected tensor {name} in {path}: it is not part of the llama architecture "
        "(is the file from a model with biases, experts or another layout?)."
    )


def model_args(
    meta: dict[str, Any], weights: dict, path: Path, rope_freqs: torch.Tensor | None
) -> ModelArgs:
    """Hyper-parameters from `llama.*` metadata; vocab and hidden sizes from the tensor shapes."""

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise CheckpointError(
                f"{path} lacks the GGUF metadata key llama.{key}; the file is incomplete or was written by an old converter"
            )
        return value

    if "tok_embeddings.weight" not in weights or "layers.0.feed_forward.w1.weight" not in weights:
        raise CheckpointError(
            f"{path} has no token_embd.weight or blk.0.ffn_gate.weight tensor: it is not a complete llama model"
        )
    dim = int(get("embedding_length"))
    n_heads = int(get("attention.head_count"))
    head_dim = int(meta.get("llama.attention.key_length", dim // n_heads))
    rope_dims = int(meta.get("llama.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise CheckpointError(
            f"{path} rotates only {rope_dims} of {head_dim} head dimensions (llama.rope.dimension_count); "
            "llamarun supports full rotary embeddings only"
        )
    try:
        return ModelArgs(
            dim=dim,
            n_layers=int(get("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(meta.get("llama.attention.head_count_kv", n_heads)),
            vocab_size=int(weights["tok_embeddings.weight"].shape[0]),
            hidden_dim=int(weights["layers.0.feed_forward.w1.weight"].shape[0]),
            norm_eps=_float32(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=_float32(meta.get("llama.rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling(meta, rope_freqs, head_dim, path),
            max_seq_len=int(meta.get("llama.context_length", 2048)),
            tie_embeddings="output.weight" not in weights,
            head_dim=head_dim if head_dim != dim // n_heads else 0,
        )
    except CheckpointError:
        raise
    except Exception as e:  # ConfigError from ModelArgs validation, with the file named
        raise CheckpointError(f"the GGUF metadata in {path} describes an invalid model: {e}") from e


def rope_scaling(
    meta: dict[str, Any], rope_freqs: torch.Tensor | None, head_dim: int, path: Path
) -> RopeScaling | None:
    """Llama 3.1-style scaling, which llama.cpp stores as a `rope_freqs` tensor of per-frequency factors."""
    kind = meta.get("llama.rope.scaling.type", "none")
    if kind not in ("none", "llama3") and float(meta.get("llama.rope.scaling.factor", 1.0)) != 1.0:
        raise CheckpointError(
            f"{path} uses rope scaling type {kind!r}; llamarun supports only Llama 3.1-style scaling (rope_freqs)"
        )
    if rope_freqs is None:
        return None
    from ..model import scale_rope_freqs

    theta = float(meta.get("llama.rope.freq_base", 10000.0))
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    factors = rope_freqs.to(torch.float64).flatten()
    scaling = RopeScaling(
        factor=float(factors.max()),
        low_freq_factor=1.0,  # Meta's values for every Llama 3.x model
        high_freq_factor=4.0,
        original_max_seq_len=int(meta.get("llama.rope.scaling.original_context_length", 8192)),
    )
    if factors.shape != freqs.shape or not torch.allclose(
        scale_rope_freqs(freqs, scaling), freqs / factors, rtol=1e-3
    ):
        raise CheckpointError(
            f"{path} has rope_freqs factors that are not Llama 3.1-style scaling; llamarun cannot reproduce them"
        )
    return scaling


def _float32(value: float) -> float:
    """The shortest decimal of a float32 metadata value (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():  # the mmap is read-only; nothing writes to these tensors
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _to_tensor(t) -> torch.Tensor:
    """A float tensor in PyTorch order: mmapped for F32/F16/BF16, dequantized to float32 otherwise."""
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    qtype = t.tensor_type.name
    if qtype in ("F32", "F16"):
        return _from_numpy(t.data).reshape(shape)
    if qtype == "BF16":
        return _from_numpy(t.data).view(torch.bfloat16).reshape(shape)
    return torch.from_numpy(
        gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
    ).reshape(shape)
