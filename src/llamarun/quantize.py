"""Weight-only quantization: Int8Linear (per output channel, or per block of 32 for GGUF Q8_0) and
Int4Linear (groups of 32, w = d * q + m with q in 0..15, like GGUF Q4_1; Q4_0 is m = -8 d).

`quantize_(model, mode)` swaps the model's nn.Linear layers in place after loading (GGUF files'
own blocks are packed.py's PackedLinear, not these layers).
Kernels: on x86 CPUs the C++ ones in csrc/, built by cpu_kernels.py (int8 activations x int8/4-bit
weights, as llama.cpp does) for one token per row, and a prompt's tokens on float32 tiles of the
dequantized rows (cpu_kernels.tiled_linear); on CUDA torch's int4 tile-packed matmul and a fused int8
dequant; elsewhere a plain dequantize-then-matmul.
"""

from __future__ import annotations

import copy
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels
from .cache import KVCache
from .errors import ConfigError
from .q4_fit import fit_q4

BLOCK = 32  # columns per activation block and per stored 4-bit group
MODES = ("int8", "int4")
INT8_LAYOUTS = ("int8", "Q8_0")  # Int8Linear: one float32 scale per output channel / per block
INT4_LAYOUTS = ("int4", "Q4_0", "Q4_1")  # Int4Linear


def _padded(in_features: int) -> int:
    return -(-in_features // BLOCK) * BLOCK


def quantized_bytes(
    layout: str, out_features: int, in_features: int, *, cuda_dtype: torch.dtype | None = None
) -> int:
    """Bytes one quantized linear holds, from the buffers its layer allocates: an int8 weight
    with float32 scales (Int8Linear), or 4-bit weights with a float16 scale and minimum per 32
    (Int4Linear) plus, run on CUDA in `cuda_dtype`, the tile-packed copy it makes there at its
    first forward (int4 and a bfloat16 scale/zero pair per 32)."""
    padded = _padded(in_features)
    groups = padded // BLOCK
    if layout in INT8_LAYOUTS:
        scales = 1 if layout == "int8" else groups
        return out_features * padded + out_features * scales * 4
    if layout not in INT4_LAYOUTS:
        raise ConfigError(f"{layout!r} is not a quantized layout; choose one of int8, int4")
    total = out_features * padded // 2 + out_features * groups * (2 + 2)
    if cuda_dtype is not None and Int4Linear.cuda_packs(in_features, cuda_dtype):
        total += out_features * in_features // 2 + out_features * groups * 2 * 2
    return total


def _prompt(x: torch.Tensor) -> bool:
    """A prompt's tokens (B, T > 1, C) in float32: on the CPU they meet the integer prompt GEMM
    (csrc/gemm_gguf.cpp, where cpu_kernels.prompt_levels() says so), else dequantized float32
    tiles (cpu_kernels.tiled_linear) at torch's GEMM's speed and with no activation rounding; one
    token per row, however many rows, takes the one-token integer kernels (batch invariance)."""
    return x.dim() == 3 and x.shape[1] > 1 and x.dtype == torch.float32


def _cpu_ops(x: torch.Tensor):
    return cpu_kernels.ops() if x.device.type == "cpu" else None


class Int8Linear(nn.Module):
    """y = x @ (weight * scales).T with int8 weight (out, in padded to 32) and float32 scales
    (out, 1) per output channel or (out, in/32) per block of 32 columns. `amx`: products of two
    or more rows on AMX tiles where the CPU has them (build.prepare_ sets it when asked)."""

    amx = False

    def __init__(
        self, in_features: int, out_features: int, *, per_block: bool = False, device=None
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        padded = _padded(in_features)
        groups = padded // BLOCK if per_block else 1
        self.register_buffer(
            "weight", torch.zeros(out_features, padded, dtype=torch.int8, device=device)
        )
        self.register_buffer(
            "scales", torch.ones(out_features, groups, dtype=torch.float32, device=device)
        )

    @classmethod
    def from_float(cls, weight: torch.Tensor, absmax: torch.Tensor | None = None) -> Int8Linear:
        """Symmetric per-output-channel quantization of a float (out, in) weight. absmax (out, 1):
        each row's largest |w| when the rows are longer than `weight` (a tensor-parallel rank
        holding a share of each row), so the share gets the whole row's scale."""
        out_features, in_features = weight.shape
        w = F.pad(weight.detach().float(), (0, _padded(in_features) - in_features))
        if absmax is None:
            absmax = w.abs().amax(dim=1, keepdim=True)
        scales = (absmax.float() / 127).clamp(min=1e-12)  # (out, 1)
        layer = cls(in_features, out_features, device="meta")
        layer.weight = torch.round(w / scales).clamp(-127, 127).to(torch.int8)
        layer.scales = scales
        return layer

    def dequantize(self) -> torch.Tensor:
        """The float32 (out, in) weight these integers stand for."""
        w = self.weight.new_empty(self.weight.shape, dtype=torch.float32)
        self._dequantize_into(0, w)
        return w[:, : self.in_features]

    def _dequantize_into(self, start: int, tile: torch.Tensor) -> None:
        """Rows start.. of the float32 weight (padded width) into tile: weight * scale."""
        n, groups = tile.shape[0], self.scales.shape[1]
        rows = slice(start, start + n)
        torch.mul(
            self.weight[rows].view(n, groups, -1),
            self.scales[rows, :, None],
            out=tile.view(n, groups, -1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = _cpu_ops(x)
        levels = cpu_kernels.prompt_levels(x) if ops is not None else 0
        if levels and _prompt(x) and not self.amx:
            return ops.int8_prompt_linear(x, self.weight, self.scales, levels)
        if ops is not None and _prompt(x) and not self.amx:
            # float32 tiles even where prompts may take bfloat16 ones: torch.mul writing bfloat16
            # made 110M-shape int8 prompts slower (716 -> 585 tok/s) instead of faster
            return cpu_kernels.tiled_linear(
                x,
                self.out_features,
                self.weight.shape[1],
                self._dequantize_into,
                self.in_features,
                bf16_fill=False,
            )
        if ops is not None:
            return ops.int8_linear(x, self.weight, self.scales, self.amx)
        if self.scales.shape[1] == 1:  # per channel: the scale moves out of the product
            w = self.weight[:, : self.in_features].to(x.dtype)
            return F.linear(x, w) * self.scales[:, 0].to(x.dtype)
        return F.linear(x, self.dequantize().to(x.dtype))

    def extra_repr(self) -> str:
        kind = "per_block" if self.scales.shape[1] > 1 else "per_channel"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}"


class Int4Linear(nn.Module):
    """4-bit weights in groups of 32: qs (out, in/2) uint8 in GGUF order (byte i of a group holds
    element i in the low nibble and element i+16 in the high one), d and m (out, in/32) float16."""

    def __init__(self, in_features: int, out_features: int, *, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        padded = _padded(in_features)
        self.register_buffer(
            "qs", torch.zeros(out_features, padded // 2, dtype=torch.uint8, device=device)
        )
        self.register_buffer(
            "d", torch.zeros(out_features, padded // BLOCK, dtype=torch.float16, device=device)
        )
        self.register_buffer(
            "m", torch.zeros(out_features, padded // BLOCK, dtype=torch.float16, device=device)
        )
        self._cuda_packed: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_float(
        cls,
        weight: torch.Tensor,
        group_size: int = BLOCK,
        importance: torch.Tensor | None = None,
    ) -> Int4Linear:
        """Asymmetric quantization per group of `group_size` columns (a multiple of 32): the
        (d, m) of each group, float16 as stored, minimizing the squared reconstruction error,
        found by a search around min/max (q4_fit.py). `importance` (in_features,), optional:
        a non-negative weight per input column for that error (e.g. the squared RMSNorm gain in
        front of the layer, which scales each column's contribution to the output)."""
        if group_size % BLOCK or group_size <= 0:
            raise ConfigError(
                f"int4 group_size must be a positive multiple of {BLOCK}, got {group_size}"
            )
        out_features, in_features = weight.shape
        if importance is not None and importance.shape != (in_features,):
            raise ConfigError(
                f"int4 importance must hold one weight per input column ({in_features}), "
                f"got shape {tuple(importance.shape)}"
            )
        padded = -(-in_features // group_size) * group_size
        w = F.pad(weight.detach().float(), (0, padded - in_features)).view(
            out_features, -1, group_size
        )
        col = None
        if importance is not None:
            col = importance.detach().float().to(w.device).clamp(min=0)
            col = col + 1e-4 * col.mean() + 1e-30  # no column is free to take any value
            col = F.pad(col, (0, padded - in_features), value=1.0).view(1, -1, group_size)
        q, d, m = fit_q4(w, col)
        per_block = group_size // BLOCK  # the kernels keep one (d, m) per 32 columns
        q = q.view(out_features, -1, BLOCK)[:, : _padded(in_features) // BLOCK]
        layer = cls(in_features, out_features, device="meta")
        layer.qs = (q[..., :16] | (q[..., 16:] << 4)).reshape(out_features, -1)
        layer.d = d.repeat_interleave(per_block, dim=1)[:, : q.shape[1]].contiguous()
        layer.m = m.repeat_interleave(per_block, dim=1)[:, : q.shape[1]].contiguous()
        layer._cuda_packed = None
        return layer

    def nibbles(self) -> torch.Tensor:
        """The integers 0..15 as uint8 (out, in padded to 32)."""
        qs = self.qs.view(self.out_features, -1, 16)
        return torch.cat([qs & 0x0F, qs >> 4], dim=-1).view(self.out_features, -1)

    def dequantize(self) -> torch.Tensor:
        q = self.nibbles().float().view(self.out_features, -1, BLOCK)
        w = q * self.d.float()[..., None] + self.m.float()[..., None]
        return w.view(self.out_features, -1)[:, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = _cpu_ops(x)
        levels = cpu_kernels.prompt_levels(x) if ops is not None else 0
        if levels and _prompt(x):
            return ops.q4_prompt_linear(x, self.qs, self.d, self.m, levels)
        if ops is not None and _prompt(x):
            fill = partial(ops.q4_rows_into, self.qs, self.d, self.m)
            return cpu_kernels.tiled_linear(
                x, self.out_features, 2 * self.qs.shape[1], fill, self.in_features
            )
        if ops is not None:
            return ops.q4_linear(x, self.qs, self.d, self.m)
        if x.device.type == "cuda" and self.cuda_packs(self.in_features, x.dtype):
            return self._cuda_forward(x)
        return F.linear(x, self.dequantize().to(x.dtype))

    @staticmethod
    def cuda_packs(in_features: int, dtype: torch.dtype) -> bool:
        """Whether CUDA runs torch's tile-packed int4 kernel (else it dequantizes per call): it
        takes bfloat16 activations and rows of a multiple of 1024 here."""
        return dtype == torch.bfloat16 and in_features % 1024 == 0

    def _cuda_forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's tile-packed int4 matmul computes w = (q - 8) * scale + zero, so zero = m + 8 d;
        # the packing depends on the GPU, hence it is made here, on the device, once.
        if self._cuda_packed is None or self._cuda_packed[0].device != x.device:
            q = self.nibbles()[:, : self.in_features].to(torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack(
                ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8), 8
            )
            d, m = self.d.float(), self.m.float()
            scales_zeros = (
                torch.stack([d, m + 8 * d], dim=-1).transpose(0, 1).contiguous()
            )  # (groups, out, 2)
            self._cuda_packed = (packed, scales_zeros.to(torch.bfloat16))
        packed, scales_zeros = self._cuda_packed
        out = torch.ops.aten._weight_int4pack_mm(
            x.reshape(-1, self.in_features), packed, BLOCK, scales_zeros
        )
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, group_size={BLOCK}"
        )


QuantizedLinear = (Int8Linear, Int4Linear)


def quantize_(model: nn.Module, mode: str, *, group_size: int = BLOCK) -> nn.Module:
    """Swap every nn.Linear of `model` for an int8 or int4 layer, in place.

    The classifier (`output`) goes to int8 in both modes: it is the largest single matrix, and
    4 bits there cost more perplexity than the speed they buy (llama.cpp keeps it at 6 bits).
    Embeddings stay float. int4 weighs each input column's error by the square of the RMSNorm
    gain in front of the layer (wq/wk/wv, w1/w3): the norm multiplies that column's input, so
    its error reaches the output scaled the same way. Returns the model.
    """
    if mode not in MODES:
        raise ConfigError(
            f"--quantize {mode!r} is not a quantization mode; choose one of: {', '.join(MODES)}"
        )
    if group_size % BLOCK or group_size <= 0:
        raise ConfigError(
            f"int4 group_size must be a positive multiple of {BLOCK}, got {group_size}"
        )
    importance = _norm_importance(model) if mode == "int4" else {}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear) or child.bias is not None:
                continue
            full = f"{name}.{child_name}" if name else child_name
            if mode == "int8" or full == "output":
                new = Int8Linear.from_float(child.weight)
            else:
                new = Int4Linear.from_float(child.weight, group_size, importance.get(id(child)))
            setattr(module, child_name, new.to(child.weight.device))
    _warm_kernels(model)
    return model


_NORMED = (  # (block's norm, its consumer, the linears reading the normalized input)
    ("attention_norm", "attention", ("wq", "wk", "wv", "wqkv")),
    ("ffn_norm", "feed_forward", ("w1", "w3", "w13")),
)


def _norm_importance(model: nn.Module) -> dict[int, torch.Tensor]:
    """id(linear) -> squared gain of the RMSNorm feeding it, for each block's normed inputs."""
    importance = {}
    for block in model.modules():
        for norm_name, owner_name, linear_names in _NORMED:
            norm, owner = getattr(block, norm_name, None), getattr(block, owner_name, None)
            gain = getattr(norm, "weight", None)
            if not isinstance(gain, torch.Tensor) or owner is None:
                continue
            for linear_name in linear_names:
                linear = getattr(owner, linear_name, None)
                if isinstance(linear, nn.Linear) and linear.in_features == gain.numel():
                    importance[id(linear)] = gain.detach().float().square()
    return importance


def cat_quantized(layers: list[nn.Module]) -> nn.Module:
    """One quantized layer computing the given layers' outputs concatenated (for fuse_)."""
    first = layers[0]
    if not all(type(lin) is type(first) and lin.in_features == first.in_features for lin in layers):
        raise ConfigError("cannot fuse quantized layers of different kinds or input sizes")
    out_features = sum(lin.out_features for lin in layers)
    if isinstance(first, Int8Linear):
        if len({lin.scales.shape[1] for lin in layers}) != 1:
            raise ConfigError("cannot fuse int8 layers mixing per-channel and per-block scales")
        fused = Int8Linear(first.in_features, out_features, device="meta")
        fused.weight = torch.cat([lin.weight for lin in layers])
        fused.scales = torch.cat([lin.scales for lin in layers])
        return fused
    fused = Int4Linear(first.in_features, out_features, device="meta")
    fused.qs = torch.cat([lin.qs for lin in layers])
    fused.d = torch.cat([lin.d for lin in layers])
    fused.m = torch.cat([lin.m for lin in layers])
    fused._cuda_packed = None
    return fused


def _warm_kernels(model: nn.Module) -> None:
    # Build (or load from the cache) the CPU extension now rather than inside the first forward,
    # where torch.compile would be tracing.
    if any(b.device.type == "cpu" for b in model.buffers()):
        cpu_kernels.ops()


def fuse_(model: nn.Module) -> nn.Module:
    """Merge wq/wk/wv into wqkv and w1/w3 into w13 (one matrix read per group); in place."""
    for layer in model.layers:
        attn, ffn = layer.attention, layer.feed_forward
        if attn.wqkv is None and hasattr(attn, "wq"):
            attn.wqkv = _cat_linears(attn.wq, attn.wk, attn.wv)
            del attn.wq, attn.wk, attn.wv
        if ffn.w13 is None and hasattr(ffn, "w1"):
            ffn.w13 = _cat_linears(ffn.w1, ffn.w3)
            del ffn.w1, ffn.w3
    return model


def _cat_linears(*linears: nn.Module) -> nn.Module:
    if not all(isinstance(lin, nn.Linear) for lin in linears):  # int8/int4 layers
        return cat_quantized(list(linears))
    weight = torch.cat([lin.weight.detach() for lin in linears], dim=0)
    fused = nn.Linear(
        weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype
    )
    fused.weight = nn.Parameter(weight, requires_grad=False)
    return fused


def quantized_copy(model: nn.Module, mode: str) -> nn.Module:
    """A copy of `model` whose float linears are quantized to `mode` by quantize_'s rules, every
    tensor else shared with `model`: embeddings, norms, linears that are quantized already, the
    KV caches and the RoPE tables. The copy costs only its new integer weights, and writes into
    the model's own caches (self-speculation: speculate.py)."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    shared |= {id(m): m for m in model.modules() if isinstance(m, KVCache)}
    draft = copy.deepcopy(model, shared)  # new modules around the same tensors
    quantize_(draft, mode)
    return draft
