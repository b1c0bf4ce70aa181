"""GGUF (llama.cpp) files of the `llama` architecture: metadata -> ModelArgs, tensors -> Meta names.

The container is read by gguf_file.py; `read_header` works out the architecture from the header
alone (for the memory plan) and `load` continues from it. Q/K are already in Meta's interleaved
RoPE layout (llama.cpp's converter undoes HF's permutation), so no tensor is permuted here. Float
tensors stay memory-mapped, and so do matrices of the block types the kernels compute on
(blocks.BLOCK_TYPES: `PackedWeight`, the file's own bytes, for packed.py's layers). The other
types gguf-py can read (the IQ1/IQ2/IQ3 families, TQ, MXFP4) are dequantized to float32 here,
with a one-line notice of what that costs.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from ..blocks import BLOCK_TYPES
from ..config import ModelArgs, RopeScaling
from ..errors import CheckpointError
from ..sniff import checkpoint_file
from ..tokenizer.gguf import GGUFTokenizer
from ..weights import (
    Checkpoint,
    CheckpointHeader,
    PackedWeight,
    StoredTensor,
    check_weights,
    packed_label,
)
from .gguf_file import GGUFFile, TensorInfo

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama",)
FLOAT_TYPES = ("F32", "F16", "BF16")
FLOAT_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# types with no kernel yet: gguf-py dequantizes them to float32 at load
DEQUANTIZED_TYPES = (
    "IQ1_S",
    "IQ1_M",
    "IQ2_XXS",
    "IQ2_XS",
    "IQ2_S",
    "IQ3_XXS",
    "IQ3_S",
    "TQ1_0",
    "TQ2_0",
    "MXFP4",
    "NVFP4",
)
SUPPORTED_TYPES = FLOAT_TYPES + BLOCK_TYPES + DEQUANTIZED_TYPES

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


def read_header(path: Path) -> CheckpointHeader:
    """Architecture, storage and tokenizer of a GGUF file from its header and tensor table."""
    file = GGUFFile(path)
    meta = file.meta
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{path} holds a GGUF model of architecture {arch!r}; llamarun supports only "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (Llama 1/2/3, TinyLlama, SmolLM, Mistral-7B and "
            "other llama-architecture exports)."
        )
    for name, t in file.tensors.items():
        if t.type_name not in SUPPORTED_TYPES:
            raise CheckpointError(
                f"Unsupported GGUF tensor type {t.type_name} for {name} in {path}. "
                f"Supported: {', '.join(SUPPORTED_TYPES)}. Re-quantize the model to one of these "
                "(e.g. llama.cpp's llama-quantize ... Q4_K_M)."
            )
    shapes = {
        canonical_name(name, path): t.shape
        for name, t in file.tensors.items()
        if name not in DROPPED
    }
    rope_freqs = file.tensors.get("rope_freqs.weight")
    if rope_freqs is not None:
        rope_freqs = _to_tensor(file, rope_freqs)
    args = model_args(meta, shapes, path, rope_freqs)
    tensors = {
        canonical_name(name, path): StoredTensor(
            t.type_name, t.shape, t.n_bytes, stays_packed(t.type_name, len(t.dims))
        )
        for name, t in file.tensors.items()
        if name not in DROPPED
    }
    by_bytes = Counter()
    for t in file.tensors.values():
        by_bytes[t.type_name] += t.n_bytes
    stored = by_bytes.most_common(1)[0][0]
    model, tokens = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.tokens")
    tokenizer = None
    if model is not None:
        kind = {"llama": "SentencePiece-style", "gpt2": "byte-level BPE"}.get(model, model)
        tokenizer = f"{kind} (in the GGUF file, {len(tokens or ())} tokens)"
    return CheckpointHeader(
        args,
        "gguf",
        path,
        FLOAT_NAMES.get(stored, stored),
        packed=packed_label(tensors),
        tokenizer=tokenizer,
        name=meta.get("general.name"),
        tensors=tensors,
        state=file,
    )


def stays_packed(qtype: str, ndim: int, keep_quantized: bool = True) -> bool:
    """Whether a tensor stays in its file blocks (matrices of a type the kernels compute on)."""
    return keep_quantized and ndim == 2 and qtype in BLOCK_TYPES


def load(source: Path | CheckpointHeader, *, keep_quantized: bool = True) -> Checkpoint:
    """The weights of a GGUF file; `keep_quantized=False` dequantizes every tensor to float32."""
    header = (
        source
        if isinstance(source, CheckpointHeader)
        else read_header(checkpoint_file(Path(source), "gguf"))
    )
    file: GGUFFile = header.state
    path = header.path
    weights: dict[str, torch.Tensor | PackedWeight] = {}
    dequantized: Counter = Counter()
    for name, t in file.tensors.items():
        if name in DROPPED:
            continue
        canonical = canonical_name(name, path)
        if stays_packed(t.type_name, len(t.dims), keep_quantized):
            weights[canonical] = PackedWeight(t.type_name, _from_numpy(file.data(t)), t.shape)
        else:
            weights[canonical] = _to_tensor(file, t)
            if t.type_name in DEQUANTIZED_TYPES:
                dequantized[t.type_name] += weights[canonical].numel()
    for qtype, n in dequantized.items():
        file_bytes = sum(t.n_bytes for t in file.tensors.values() if t.type_name == qtype)
        log.warning(
            "llamarun: GGUF type %s has no kernel yet: its tensors in %s are dequantized to float32 "
            "at load (%.0f MB in memory for %.0f MB in the file)",
            qtype,
            path,
            n * 4 / 1e6,
            file_bytes / 1e6,
        )
    check_weights(header.args, weights, str(path), source="the GGUF metadata")
    matrix_types = {t.type_name for t in file.tensors.values() if len(t.dims) == 2}
    stored = {"F16": torch.float16, "BF16": torch.bfloat16}
    dtype = (
        stored[matrix_types.pop()]
        if len(matrix_types) == 1 and matrix_types <= stored.keys()
        else torch.float32
    )
    return Checkpoint(
        args=header.args,
        weights=weights,
        tokenizer=GGUFTokenizer.from_metadata(file.meta, path),
        path=path,
        format="gguf",
        chat_template=file.meta.get("tokenizer.chat_template"),
        dtype=dtype,
    )


_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)")


def canonical_name(name: str, path: Path) -> str:
    base, _, suffix = name.rpartition(".")
    if base in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[base]}.{suffix}"
    m = _BLOCK_NAME.fullmatch(base)
    if m and m.group(2) in LAYER_NAMES:
        return f"layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}.{suffix}"
    raise CheckpointError(
        f"Unexpected tensor {name} in {path}: it is not part of the llama architecture "
        "(is the file from a model with biases, experts or another layout?)."
    )


def model_args(
    meta: dict[str, Any],
    shapes: dict[str, tuple[int, ...]],
    path: Path,
    rope_freqs: torch.Tensor | None,
) -> ModelArgs:
    """Hyper-parameters from `llama.*` metadata; vocab and hidden sizes from the tensor shapes."""

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise CheckpointError(
                f"{path} lacks the GGUF metadata key llama.{key}; the file is incomplete or was written by an old converter"
            )
        return value

    if "tok_embeddings.weight" not in shapes or "layers.0.feed_forward.w1.weight" not in shapes:
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
            vocab_size=int(shapes["tok_embeddings.weight"][0]),
            hidden_dim=int(shapes["layers.0.feed_forward.w1.weight"][0]),
            norm_eps=_float32(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=_float32(meta.get("llama.rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling(meta, rope_freqs, head_dim, path),
            max_seq_len=int(meta.get("llama.context_length", 2048)),
            tie_embeddings="output.weight" not in shapes,
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
        scaling.apply(freqs), freqs / factors, rtol=1e-3
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


def _to_tensor(file: GGUFFile, t: TensorInfo) -> torch.Tensor:
    """A float tensor in PyTorch order: mmapped for F32/F16/BF16, dequantized to float32 otherwise."""
    data = file.data(t)
    if t.type_name in ("F32", "F16"):
        return _from_numpy(data)
    if t.type_name == "BF16":
        return _from_numpy(data).view(torch.bfloat16)
    return torch.from_numpy(
        gguf.quants.dequantize(data, t.type).astype(np.float32, copy=False)
    ).reshape(t.shape)
