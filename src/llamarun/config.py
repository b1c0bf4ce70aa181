"""ModelArgs: architecture facts only (no batch size, device, dtype or file format)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .errors import ConfigError


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 frequency scaling (Meta's `apply_scaling`, HF rope_type "llama3")."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192

    def apply(self, freqs: torch.Tensor) -> torch.Tensor:
        """The scaled rotary frequencies: long wavelengths divided by `factor`, short ones kept,
        a smooth blend in between (Meta's llama3 `apply_scaling`; HF `_compute_llama3_parameters`)."""
        low_wavelen = self.original_max_seq_len / self.low_freq_factor
        high_wavelen = self.original_max_seq_len / self.high_freq_factor
        wavelen = 2 * math.pi / freqs
        smooth = (self.original_max_seq_len / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        blended = (1 - smooth) * freqs / self.factor + smooth * freqs
        scaled = torch.where(wavelen > low_wavelen, freqs / self.factor, freqs)
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(is_medium, blended, scaled)


@dataclass(frozen=True)
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    hidden_dim: int
    n_kv_heads: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 2048  # the context the weights were trained for
    tie_embeddings: bool = False
    head_dim: int = field(default=0)  # 0: dim // n_heads (HF configs may set it explicitly)

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "hidden_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})"
            )
        if not self.head_dim:
            if self.dim % self.n_heads:
                raise ConfigError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.head_dim % 2:
            raise ConfigError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if not (self.norm_eps > 0 and math.isfinite(self.norm_eps)):
            raise ConfigError(f"norm_eps must be positive, got {self.norm_eps}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta}")

    @property
    def n_rep(self) -> int:
        return self.n_heads // self.n_kv_heads

    def n_params(self) -> int:
        """Number of parameters (embedding and untied classifier counted once each)."""
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        ffn = 3 * self.dim * self.hidden_dim
        per_layer = attn + ffn + 2 * self.dim
        embed = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + embed + self.dim


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """SwiGLU hidden size from Meta's params.json: 2/3 of 4*dim, scaled, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# Convenience table for `llamarun info`, memory plans and tests; never used to infer a loaded model.
KNOWN_MODELS: dict[str, ModelArgs] = {
    "llama-2-7b": ModelArgs(
        dim=4096, n_layers=32, n_heads=32, vocab_size=32000, hidden_dim=11008, max_seq_len=4096
    ),
    "llama-2-13b": ModelArgs(
        dim=5120, n_layers=40, n_heads=40, vocab_size=32000, hidden_dim=13824, max_seq_len=4096
    ),
    "llama-2-70b": ModelArgs(
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        vocab_size=32000,
        hidden_dim=28672,
        max_seq_len=4096,
    ),
    "llama-3-8b": ModelArgs(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=128256,
        hidden_dim=14336,
        rope_theta=500000.0,
        max_seq_len=8192,
    ),
    "llama-3.1-8b": ModelArgs(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=128256,
        hidden_dim=14336,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(),
        max_seq_len=131072,
    ),
    "llama-3.2-1b": ModelArgs(
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=128256,
        hidden_dim=8192,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(factor=32.0),
        max_seq_len=131072,
        tie_embeddings=True,
    ),
    "stories15M": ModelArgs(
        dim=288,
        n_layers=6,
        n_heads=6,
        vocab_size=32000,
        hidden_dim=768,
        max_seq_len=256,
        tie_embeddings=True,
    ),
    "stories110M": ModelArgs(
        dim=768,
        n_layers=12,
        n_heads=12,
        vocab_size=32000,
        hidden_dim=2048,
        max_seq_len=1024,
        tie_embeddings=True,
    ),
}
