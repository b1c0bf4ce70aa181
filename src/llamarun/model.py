"""Llama architecture. Follows Meta's reference model: RMSNorm, rotary embeddings on interleaved
pairs (with Llama 3.1 frequency scaling), grouped-query attention, SwiGLU feed-forward.

No file formats, tokenizers, sampling or devices here. Linear layers are plain `nn.Linear`;
quantize.py swaps them (and its `fuse_` merges q/k/v and gate/up), cpu.py routes them to kernels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .config import ModelArgs


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 like Meta's reference, then cast back (matters for bf16/fp16).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_tables(args: ModelArgs, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (seq_len, D/2), computed in float32."""
    d = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32)[: d // 2] / d))
    if args.rope_scaling is not None:
        freqs = args.rope_scaling.apply(freqs)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), freqs)  # (S, D/2)
    return angles.cos(), angles.sin()


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (B, T, H, D) by cos/sin (B, T, 1, D/2)."""
    xf = x.float().unflatten(-1, (-1, 2))  # (B, T, H, D/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


def cut_short(input_pos: torch.Tensor) -> bool:
    """Whether attention reads the cache only up to the furthest position written (eager CPU
    runs); a compiled step keeps the static length (fixed shapes), and so does a GPU, where
    reading the length would cost a host sync every step."""
    return not torch.compiler.is_compiling() and input_pos.device.type == "cpu"


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.wqkv: nn.Module | None = None  # set by fuse_()
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, input_pos, rows):
        B, T, _ = x.shape
        if self.wqkv is not None:
            q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
            q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        length = mask.shape[-1]  # slots that can be attended to (see Transformer.forward)
        keys, values = self.kv_cache.update(rows, input_pos, k, v, length)  # (B, Hkv, L, D)
        if keys.dtype != q.dtype:  # a float16 cache under a float32 model (--kv-cache-dtype)
            keys, values = keys.to(q.dtype), values.to(q.dtype)
        n_rep = self.n_heads // self.n_kv_heads
        if n_rep > 1:
            keys = keys.repeat_interleave(n_rep, dim=1)  # (B, H, L, D)
            values = values.repeat_interleave(n_rep, dim=1)
        q = q.transpose(1, 2)  # (B, H, T, D)
        if T == 1 and cut_short(input_pos):
            # Decoding on an eager CPU, each row attends over its own length: SDPA's sums over
            # L=13 and L=6 round differently, so over the batch's length a row's result would
            # depend on how far the rows beside it are (batch invariance).
            ends = (input_pos[:, -1] + 1).tolist()
            out = torch.cat(
                [
                    F.scaled_dot_product_attention(
                        q[b : b + 1], keys[b : b + 1, :, :n], values[b : b + 1, :, :n]
                    )
                    for b, n in enumerate(ends)
                ]
            )
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))  # (B, T, C)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        # silu(gate) * up; cpu.use_cpu_kernels_ swaps in a row-by-row kernel (batch invariance)
        self.act: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = swiglu
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)  # down
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)  # up
        self.w13: nn.Module | None = None  # set by fuse_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is not None:
            gate, up = self.w13(x).chunk(2, dim=-1)
        else:
            gate, up = self.w1(x), self.w3(x)
        return self.w2(self.act(gate, up))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, mask, input_pos, rows):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, input_pos, rows)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        if torch.get_default_device().type == "meta":
            # a skeleton for the loaders to fill: nn.Embedding's normal_ init on a meta tensor
            # imports torch._dynamo, 2.3 s of every command's start (the Linears' uniform_ does
            # not); a meta tensor holds no values, so skipping the init changes nothing
            weight = torch.empty(args.vocab_size, args.dim)
            self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim, _weight=weight)
        else:
            self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.max_batch_size = 0
        self.max_seq_len = 0

    def setup_caches(
        self, max_batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None
    ) -> None:
        """Allocate a static KV cache per layer and the RoPE tables for `max_seq_len` positions."""
        device = self.norm.weight.device
        dtype = dtype or self.norm.weight.dtype
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        for layer in self.layers:
            attention = layer.attention  # its own head count: a tensor-parallel rank holds a share
            attention.kv_cache = KVCache(
                max_batch_size, max_seq_len, attention.n_kv_heads, attention.head_dim, dtype, device
            )
        cos, sin = rope_tables(self.args, max_seq_len)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)
        self.register_buffer("slot_ids", torch.arange(max_seq_len, device=device), persistent=False)

    def forward(
        self,
        tokens: torch.Tensor,
        input_pos: torch.Tensor,
        rows: torch.Tensor | None = None,
        *,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """tokens (B, T) written at cache positions input_pos (B, T) of cache rows `rows` (B,)
        (default: rows 0..B-1). Returns logits (B, V) for the last position, or (B, T, V)."""
        h = self.tok_embeddings(tokens)  # (B, T, C)
        h = self.forward_layers(h, input_pos, rows)
        return self.forward_head(h, all_logits=all_logits)

    # forward's parts, callable apart so a pipeline stage runs only its own (pp.py)

    def forward_layers(
        self, h: torch.Tensor, input_pos: torch.Tensor, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The blocks in self.layers over hidden states h (B, T, C) at positions input_pos (B, T)."""
        assert self.max_seq_len, "call setup_caches() before forward()"
        cos = self.rope_cos[input_pos].unsqueeze(2)  # (B, T, 1, D/2)
        sin = self.rope_sin[input_pos].unsqueeze(2)
        # A query at position p sees cache slots 0..p of its own row; later slots hold stale data.
        # Only slots 0..L-1 (L: the furthest position in this batch) can be attended to, so eager
        # CPU runs read no more of the cache. A compiled step keeps the static length S (fixed
        # shapes), and so does a GPU, where reading L would cost a host sync every step.
        length = int(input_pos.max()) + 1 if cut_short(input_pos) else self.max_seq_len
        mask = (self.slot_ids[:length] <= input_pos.unsqueeze(-1)).unsqueeze(1)  # (B, 1, T, L)
        for layer in self.layers:
            h = layer(h, cos, sin, mask, input_pos, rows)
        return h

    def forward_head(self, h: torch.Tensor, *, all_logits: bool = False) -> torch.Tensor:
        """Logits (B, V) of the last position of h (B, T, C), or (B, T, V) with all_logits."""
        if not all_logits:
            h = h[:, -1]
        return self.output(self.norm(h)).float()
