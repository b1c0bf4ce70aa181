"""KVCache: static, preallocated key/value buffers, one per layer.

Every batch row is a slot with its own positions, so rows of different lengths (and requests that
join a running batch) share one cache without padding.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

_NUMPY = {torch.float32: np.float32, torch.float16: np.float16}


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """Zeros that cost nothing until written, on CPU: numpy's zeros are calloc's, whose large
    blocks are fresh zero pages of the OS, made resident as positions are written. torch.zeros
    wrote every page at load (75 ms and 190 MB resident for SmolLM2's 4096 positions). The
    slots beyond a row's length must still be finite zeros, not garbage: masked attention
    weights of 0 times a NaN would be NaN."""
    place = torch.device(device) if device is not None else torch.get_default_device()
    if place.type == "cpu" and dtype in _NUMPY:
        return torch.from_numpy(np.zeros(shape, dtype=_NUMPY[dtype]))
    return torch.zeros(shape, dtype=dtype, device=device)


class KVCache(nn.Module):
    def __init__(
        self,
        max_batch_size: int,
        max_seq_len: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)  # (B, Hkv, S, D)
        self.register_buffer("k", _zeros(shape, dtype, device), persistent=False)
        self.register_buffer("v", _zeros(shape, dtype, device), persistent=False)

    def update(
        self,
        rows: torch.Tensor | None,
        input_pos: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        length: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, T, Hkv, D) at input_pos (B, T) of `rows` (B,) and return those rows'
        cache slots 0..length-1 (B, Hkv, length, D); all of them when length is None."""
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)  # a no-op unless the cache has its own dtype
        cut = slice(None, length)
        if rows is None:
            batch = torch.arange(k.shape[0], device=k.device)[:, None]  # (B, 1)
            self.k[batch, :, input_pos] = k
            self.v[batch, :, input_pos] = v
            return self.k[: k.shape[0], :, cut], self.v[: k.shape[0], :, cut]
        self.k[rows[:, None], :, input_pos] = k
        self.v[rows[:, None], :, input_pos] = v
        if rows.numel() == 1 and rows.device.type == "cpu" and not torch.compiler.is_compiling():
            # one row (a prompt, a verification): a view. Gathering copied all max_seq_len slots
            # of every layer per forward, 190 MB on SmolLM2 at 4096, for the L that are read.
            r = int(rows) % self.k.shape[0]  # as the write above reads a negative row
            return self.k[r : r + 1, :, cut], self.v[r : r + 1, :, cut]
        return self.k[rows, :, cut], self.v[rows, :, cut]  # gathers only slots 0..length-1

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()
