"""The CPU fast path, in one place: what runs on the C++ kernels (cpu_kernels.py) and when.

- `CpuLinear`: an nn.Linear whose float32 matrix-vector products run on the kernel (MKL reaches
  a fraction of memory bandwidth at batch 1); `use_cpu_kernels_` swaps a model's float32 linears
  for it. build.py calls it; nothing else changes a model.
- `CpuStep`: the whole one-token decode step in one C++ call. At batch 1 an eager step spends
  more time dispatching its ~40 torch ops per layer than reading weights; the extension's
  `Decoder` runs per layer four parallel matrix products (q/k/v and gate/up each as one product)
  and RMSNorm, RoPE, the cache write, attention and SwiGLU as plain loops over float32: the same
  arithmetic as `Transformer.forward`, so logits agree to float rounding. A model it cannot take
  (not float32, offloaded layers, linears of another kind, no kernels) keeps the eager forward.
- `argmax_ids`: greedy picks by the extension's vectorised scan.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from . import cpu_kernels
from .blocks import TYPE_IDS
from .model import FeedForward, Transformer, TransformerBlock
from .packed import PackedEmbedding, PackedLinear
from .quantize import Int4Linear, Int8Linear

log = logging.getLogger(__name__)


class CpuLinear(nn.Linear):
    """nn.Linear (same weight, same state dict) whose float32 products on CPU run on the C++
    kernel: MKL reaches a fraction of memory bandwidth at batch 1 (issue 5), and its sums for a
    row depend on how many rows it multiplies. A prompt's tokens (x of shape (B, T > 1, C)) go
    to a GEMM (cpu_kernels.f32_prompt_linear: oneDNN's, or MKL's), faster there; one token per
    row, however many rows, never does, so a decode step's row is the same alone and in a batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = cpu_kernels.ops() if x.device.type == "cpu" else None
        if ops is None or self.bias is not None:
            return super().forward(x)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            if x.dim() == 3 and x.shape[1] > 1:
                return cpu_kernels.f32_prompt_linear(x, self.weight)
            return ops.f32_linear(x, self.weight)
        return super().forward(x)


def use_cpu_kernels_(model: nn.Module) -> nn.Module:
    """Route the float32 nn.Linear layers of a CPU model through CpuLinear, sharing their weights
    (a tied classifier stays tied), and their SwiGLU through the kernels' row-by-row silu_mul (it
    falls back to torch for tensors elsewhere); in place. No-op where the CPU kernels are
    unavailable."""
    if cpu_kernels.ops() is None:
        return model
    for module in list(model.modules()):
        if isinstance(module, FeedForward):
            module.act = cpu_kernels.silu_mul
        for name, child in list(module.named_children()):
            if (
                type(child) is nn.Linear
                and child.bias is None
                and child.weight.dtype == torch.float32
                and child.weight.device.type == "cpu"
                and child.weight.is_contiguous()
            ):
                fast = CpuLinear(child.in_features, child.out_features, bias=False, device="meta")
                fast.weight = child.weight
                setattr(module, name, fast)
    return model


_EMPTY = torch.empty(0)


def _linear_entry(lin: nn.Module | None) -> tuple[int, list[torch.Tensor]] | None:
    """(kind, three tensors) describing `lin` to the Decoder, or None when it cannot run it."""
    kinds = cpu_kernels.linear_kinds()  # the Decoder's codes, from the built extension
    if lin is None:
        return kinds["NONE"], [_EMPTY, _EMPTY, _EMPTY]
    if isinstance(lin, Int8Linear):
        kind, tensors = kinds["INT8"], [lin.weight, lin.scales, _EMPTY]
    elif isinstance(lin, Int4Linear):
        kind, tensors = kinds["Q4"], [lin.qs, lin.d, lin.m]
    elif isinstance(lin, PackedLinear):
        spec = torch.tensor([TYPE_IDS[lin.qtype], lin.in_features])
        kind, tensors = kinds["GGUF"], [lin.data, spec, _EMPTY]
    elif isinstance(lin, nn.Linear) and lin.bias is None and lin.weight.dtype == torch.float32:
        kind, tensors = kinds["F32"], [lin.weight.detach(), _EMPTY, _EMPTY]
    else:
        return None
    if not all(t.device.type == "cpu" and t.is_contiguous() for t in tensors):
        return None
    return kind, tensors


def _block_linears(block: TransformerBlock) -> list[nn.Module | None]:
    """wq wk wv wo w1 w3 w2, with a fused wqkv in wq's place and w13 in w1's (others None)."""
    attn, ffn = block.attention, block.feed_forward
    qkv = [attn.wqkv, None, None] if attn.wqkv is not None else [attn.wq, attn.wk, attn.wv]
    gate_up = [ffn.w13, None] if ffn.w13 is not None else [ffn.w1, ffn.w3]
    return [*qkv, attn.wo, *gate_up, ffn.w2]


def _decoder(model: Transformer, amx: bool = False) -> object | None:
    """The extension's Decoder over `model`'s weights and caches, or None when it cannot run it.
    amx: per-channel int8 products of 2+ rows on AMX tiles (faster; not batch-invariant)."""
    ops = cpu_kernels.ops()
    if ops is None or not model.max_seq_len or model.norm.weight.device.type != "cpu":
        return None
    if not all(type(layer) is TransformerBlock for layer in model.layers):
        return None  # e.g. offloaded blocks
    kinds: list[int] = []
    weights: list[torch.Tensor] = []
    linears = [lin for block in model.layers for lin in _block_linears(block)]
    for lin in [*linears, model.output]:
        entry = _linear_entry(lin)
        if entry is None:
            return None
        kinds.append(entry[0])
        weights.extend(entry[1])
    norms = [n.weight.detach() for b in model.layers for n in (b.attention_norm, b.ffn_norm)]
    norms.append(model.norm.weight.detach())
    caches = [t for b in model.layers for t in (b.attention.kv_cache.k, b.attention.kv_cache.v)]
    embedding, embed_type = _embedding(model)
    tensors = [*norms, model.rope_cos, model.rope_sin] + ([embedding] if embed_type < 0 else [])
    if any(t.dtype != torch.float32 or not t.is_contiguous() for t in tensors):
        return None
    if caches[0].dtype not in (torch.float32, torch.float16) or not all(
        c.dtype == caches[0].dtype and c.is_contiguous() for c in caches
    ):
        return None  # the step keeps contiguous caches in float32 or float16
    args = model.args
    try:
        decoder = torch.classes.llamarun_cpu.Decoder(
            norms,
            weights,
            kinds,
            caches,
            model.rope_cos,
            model.rope_sin,
            embedding,
            embed_type,
            args.n_heads,
            args.n_kv_heads,
            args.norm_eps,
        )
    except RuntimeError as e:  # shapes the step does not know: the eager forward still runs them
        log.warning("llamarun: one-call CPU decode step unavailable (%s); using the eager step", e)
        return None
    decoder.set_amx(amx)
    return decoder


def _embedding(model: Transformer) -> tuple[torch.Tensor, int]:
    """The token embedding table for the Decoder: float32 (type -1) or GGUF block rows (type id)."""
    table = model._modules["tok_embeddings"]  # through the dicts: _places runs every step
    if isinstance(table, PackedEmbedding):
        return table._buffers["data"], TYPE_IDS[table.qtype]
    return table._parameters["weight"].detach(), -1


def _built_over(model: Transformer) -> tuple[list, list, list, tuple[int, ...]]:
    """What a Decoder is built over, in a form cheap to check before every step: each block and
    its linear and cache modules as parallel lists (the owner's module dict, the name, the
    module) — quantize_, fuse_, setup_caches and offloading replace those — and where the
    weights live (.to() moves them). nn.Module's __getattr__ would cost ~400 us a step on 30
    layers; `map(dict.get, ...)` over these lists runs in C (~2 us)."""
    watched = []
    for i, block in enumerate(model.layers):
        watched.append((model.layers._modules, str(i), block))
        for owner in (block.attention, block.feed_forward):
            watched += [(owner._modules, name, m) for name, m in owner._modules.items()]
    watched += [(model._modules, name, m) for name, m in model._modules.items()]
    owners, names, modules = (list(column) for column in zip(*watched))
    return owners, names, modules, _places(model)


def _places(model: Transformer) -> tuple[int, ...]:
    """Where the norm, embedding and RoPE tables live, read through the module dicts (fast)."""
    modules = model._modules
    return (
        modules["norm"]._parameters["weight"].data_ptr(),
        _embedding(model)[0].data_ptr(),
        model._buffers["rope_cos"].data_ptr(),
    )


class CpuStep:
    """Calls like `model(tokens, input_pos, rows)` for tokens (B, 1); returns logits (B, V).

    The Decoder holds the tensors it was built over; when the model has changed since (new
    caches, quantize_, .to()), a new one is built over what the model now holds, or the eager
    forward runs when the step cannot take it any more."""

    def __init__(self, model: Transformer, decoder: object, amx: bool = False):
        self.model = model
        self.decoder = decoder
        self.amx = amx
        self.owners, self.names, self.modules, self.places = _built_over(model)
        self._rows: dict[int, torch.Tensor] = {}

    def _model_changed(self) -> bool:
        # model.layers' own module dict is owners[0]: a block added or removed changes its size
        return (
            len(self.owners[0]) != len(self.model._modules["layers"])
            or list(map(dict.get, self.owners, self.names)) != self.modules
            or _places(self.model) != self.places
        )

    @classmethod
    def build(cls, model: Transformer, amx: bool = False) -> CpuStep | None:
        """A CpuStep for `model`, or None when the model or the machine cannot use one."""
        decoder = _decoder(model, amx)
        return cls(model, decoder, amx) if decoder is not None else None

    def __call__(
        self, tokens: torch.Tensor, input_pos: torch.Tensor, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self._model_changed():
            self.decoder = _decoder(self.model, self.amx)
            self.owners, self.names, self.modules, self.places = _built_over(self.model)
        if self.decoder is None or tokens.shape[1] != 1:
            return self.model(tokens, input_pos, rows)
        if rows is None:  # rows 0..B-1, made once per batch size (a torch op costs ~5 us)
            rows = self._rows.get(tokens.shape[0])
            if rows is None:
                rows = self._rows[tokens.shape[0]] = torch.arange(tokens.shape[0])
        return self.decoder.step(tokens.view(-1), input_pos.view(-1), rows)


def argmax_ids(logits: torch.Tensor) -> list[int]:
    """The index of each row's largest logit, (B, V) -> B ids, with torch's tie rule (the first).
    On CPU float32 the extension's scan: torch.argmax costs ~30 us per 32000 logits."""
    ops = cpu_kernels.ops() if logits.device.type == "cpu" else None
    if ops is not None and logits.dtype == torch.float32 and logits.dim() == 2:
        return ops.argmax_rows(logits).tolist()
    return logits.argmax(dim=-1).tolist()
