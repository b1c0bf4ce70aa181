"""Writes a llamarun Transformer as a llama2.c `.bin` (legacy v0, version 1 fp32, version 2 Q8_0)
with `struct`, byte for byte as karpathy/llama2.c's export.py does (its legacy_export,
version1_export and version2_export)."""

from __future__ import annotations

import struct
from pathlib import Path

import torch

MAGIC = 0x616B3432  # "ak42"
MATRICES = (
    "attention.wq",
    "attention.wk",
    "attention.wv",
    "attention.wo",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
)


def write_llama2c(path: Path, model, version: int = 0, *, group_size: int = 64) -> Path:
    """`model`: a llamarun Transformer (Meta names, interleaved RoPE: what llama2.c stores).
    The classifier is written only when it is not tied to the embedding."""
    args = model.args
    sd = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    L = args.n_layers
    shared = args.tie_embeddings or torch.equal(sd["tok_embeddings.weight"], sd["output.weight"])
    layer = lambda name: [sd[f"layers.{i}.{name}.weight"] for i in range(L)]  # noqa: E731
    with open(path, "wb") as f:
        if version == 0:
            vocab = args.vocab_size if shared else -args.vocab_size  # negative: unshared classifier
            f.write(
                struct.pack(
                    "<7i",
                    args.dim,
                    args.hidden_dim,
                    L,
                    args.n_heads,
                    args.n_kv_heads,
                    vocab,
                    args.max_seq_len,
                )
            )
            tensors = [sd["tok_embeddings.weight"], *layer("attention_norm")]
            tensors += [w for name in MATRICES[:4] for w in layer(name)]
            tensors += layer("ffn_norm")
            tensors += [w for name in MATRICES[4:] for w in layer(name)]
            tensors.append(sd["norm.weight"])
            # the RoPE tables (freqs_cos, freqs_sin) of llama2.c's model.py, seq_len x head_dim/2 each
            freqs = 1.0 / (10000.0 ** (torch.arange(0, args.head_dim, 2).float() / args.head_dim))
            angles = torch.outer(torch.arange(args.max_seq_len).float(), freqs)
            tensors += [angles.cos(), angles.sin()]
            if not shared:
                tensors.append(sd["output.weight"])
            for t in tensors:
                f.write(t.numpy().astype("<f4").tobytes())
            return Path(path)
        f.write(struct.pack("<Ii", MAGIC, version))
        f.write(
            struct.pack(
                "<7i",
                args.dim,
                args.hidden_dim,
                L,
                args.n_heads,
                args.n_kv_heads,
                args.vocab_size,
                args.max_seq_len,
            )
        )
        f.write(struct.pack("<B", int(shared)))
        if version == 2:
            f.write(struct.pack("<i", group_size))
        f.write(b"\0" * (256 - f.tell()))
        norms = [*layer("attention_norm"), *layer("ffn_norm"), sd["norm.weight"]]
        matrices = [sd["tok_embeddings.weight"], *[w for name in MATRICES for w in layer(name)]]
        if not shared:
            matrices.append(sd["output.weight"])
        for t in norms if version == 2 else norms + matrices:
            f.write(t.numpy().astype("<f4").tobytes())
        if version == 2:
            for w in matrices:
                q, scale = quantize_q80(w, group_size)
                f.write(q.numpy().tobytes())
                f.write(scale.numpy().astype("<f4").tobytes())
    return Path(path)


def quantize_q80(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 in [-127, 127], one fp32 scale per group of consecutive values."""
    groups = w.float().reshape(-1, group_size)
    scale = groups.abs().max(dim=1).values / 127.0
    q = torch.round(groups / scale[:, None]).to(torch.int8)
    return q, scale


def dequantize_q80(q: torch.Tensor, scale: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return (q.float() * scale[:, None]).reshape(shape)
