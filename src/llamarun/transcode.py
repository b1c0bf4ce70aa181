"""GGUF blocks in the layouts GPU kernels take: transcoded once, when a packed layer reaches a GPU.

- Q4_0, Q4_1, Q4_K become the int4 group-32 layout of torch's `_weight_int4pack_mm`: a Q4_K
  sub-block of 32 is exactly w = (d * sc) * q - dmin * m with q in 0..15, so the 4-bit values
  are the file's and only the scale and zero round (to bfloat16, the kernel's dtype).
- The other types become int8 with a float32 scale (and zero, for the types with minimums) per
  group of 16 or 32: Q8_0, Q6_K, Q5_0, Q3_K, IQ4_NL and IQ4_XS exactly, w = scale * q; Q5_1,
  Q5_K, Q2_K as w = scale * q + zero. Where torch's int4 kernel cannot run (not CUDA with
  bfloat16), the 4-bit types take this layout too.
The unpacking is device-independent torch, tested on CPU against gguf-py; no file format here
beyond the block layouts blocks.py reads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import blocks
from .blocks import _bits, _f16, _k_scales, _nibbles32
from .packed import PackedLinear
from .quantize import BLOCK

INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")


def int4_values(layer: PackedLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, scale, zero) of a Q4_0/Q4_1/Q4_K layer with w = q * scale + zero: q uint8 0..15
    (out, in), scale and zero float32 (out, in/32), all exact."""
    out, cols = layer.out_features, layer.in_features
    size, nbytes = blocks.BLOCK_SIZES[layer.qtype]
    b = layer.data.reshape(-1, nbytes)
    if layer.qtype == "Q4_K":
        sc, mn = _k_scales(b[:, 4:16])
        q = _bits(b[:, 16:144].reshape(-1, 4, 32), (0, 4), 15).reshape(-1, 8, 32)
        scale, zero = _f16(b, 0) * sc, -_f16(b, 2) * mn  # (blocks, 8): per sub-block of 32
    else:
        q = _nibbles32(b[:, 2 if layer.qtype == "Q4_0" else 4 :][:, :16])
        scale = _f16(b, 0)
        zero = -8 * scale if layer.qtype == "Q4_0" else _f16(b, 2)
    return q.reshape(out, cols), scale.reshape(out, -1), zero.reshape(out, -1)


def int8_values(
    layer: PackedLinear,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """(q, scale, zero, group) with w = q * scale (+ zero) per group of `group` columns: q int8
    (out, in), scale and zero float32 (out, in/group); zero is None for the symmetric types."""
    qtype, out, cols = layer.qtype, layer.out_features, layer.in_features
    nbytes = blocks.BLOCK_SIZES[qtype][1]
    b = layer.data.reshape(-1, nbytes)
    zero = None
    if qtype in INT4_TYPES:
        q, scale, zero = int4_values(layer)
        # q - 8 fits int8; Q4_0's w = d * (q - 8) then needs no zero
        return q.to(torch.int8) - 8, scale, None if qtype == "Q4_0" else zero + 8 * scale, BLOCK
    if qtype == "Q8_0":
        q, scale, group = b[:, 2:34].contiguous().view(torch.int8), _f16(b, 0), 32
    elif qtype in ("Q5_0", "Q5_1"):
        at = 2 if qtype == "Q5_0" else 4
        high = _bits(b[:, at : at + 4].unsqueeze(-1), tuple(range(8)), 1).reshape(-1, 32)
        q = (_nibbles32(b[:, at + 4 : at + 20]) | (high << 4)).to(torch.int8)
        scale, group = _f16(b, 0), 32
        if qtype == "Q5_0":
            q = q - 16
        else:
            zero = _f16(b, 2)
    elif qtype == "IQ4_NL":
        values = torch.tensor(blocks.IQ4_VALUES, dtype=torch.int8, device=b.device)
        q, scale, group = values[_nibbles32(b[:, 2:18]).long()], _f16(b, 0), 32
    else:
        q, scale, zero, group = _k_quant_int8(qtype, b)
    zero = None if zero is None else zero.reshape(out, -1)
    return q.reshape(out, cols), scale.reshape(out, -1), zero, group


def _k_quant_int8(qtype: str, b: torch.Tensor):
    """int8 values and per-group scales of the K-quants other than Q4_K, and IQ4_XS."""
    n = b.shape[0]
    if qtype == "Q6_K":
        ql = _bits(b[:, 0:128].reshape(n, 2, 64), (0, 4), 15).reshape(n, 8, 32)
        qh = _bits(b[:, 128:192].reshape(n, 2, 32), (0, 2, 4, 6), 3).reshape(n, 8, 32)
        q = (ql | (qh << 4)).to(torch.int8) - 32
        sc = b[:, 192:208].contiguous().view(torch.int8).float()
        return q, _f16(b, 208) * sc, None, 16
    if qtype == "Q3_K":
        s = b[:, 96:108]
        low = _bits(s[:, 0:8].reshape(n, 1, 8), (0, 4), 15).reshape(n, 16)
        high = _bits(s[:, 8:12].reshape(n, 1, 4), (0, 2, 4, 6), 3).reshape(n, 16)
        ql = _bits(b[:, 32:96].reshape(n, 2, 32), (0, 2, 4, 6), 3).reshape(n, 16, 16)
        qh = _bits(b[:, 0:32].reshape(n, 1, 32), tuple(range(8)), 1).reshape(n, 16, 16)
        q = ql.to(torch.int8) - 4 * (1 - qh.to(torch.int8))
        return q, _f16(b, 108) * ((low | (high << 4)).float() - 32), None, 16
    if qtype == "Q2_K":
        sc = b[:, 0:16]
        q = _bits(b[:, 16:80].reshape(n, 2, 32), (0, 2, 4, 6), 3).to(torch.int8)
        return q, _f16(b, 80) * (sc & 15).float(), -_f16(b, 82) * (sc >> 4).float(), 16
    if qtype == "Q5_K":
        sc, mn = _k_scales(b[:, 4:16])
        ql = _bits(b[:, 48:176].reshape(n, 4, 32), (0, 4), 15).reshape(n, 8, 32)
        qh = _bits(b[:, 16:48].reshape(n, 1, 32), tuple(range(8)), 1).reshape(n, 8, 32)
        q = (ql | (qh << 4)).to(torch.int8)
        return q, _f16(b, 0) * sc, -_f16(b, 2) * mn, 32
    if qtype == "IQ4_XS":
        high = b[:, 2].int() | (b[:, 3].int() << 8)
        shifts = torch.arange(0, 16, 2, device=b.device, dtype=torch.int32)
        sh = ((high.unsqueeze(1) >> shifts) & 3).to(torch.uint8)
        sl = _bits(b[:, 4:8].reshape(n, 4, 1), (0, 4), 15).reshape(n, 8)
        values = torch.tensor(blocks.IQ4_VALUES, dtype=torch.int8, device=b.device)
        idx = _bits(b[:, 8:136].reshape(n, 8, 16), (0, 4), 15).reshape(n, 8, 32)
        return values[idx.long()], _f16(b, 0) * ((sl | (sh << 4)).float() - 32), None, 32
    raise ValueError(f"no int8 layout for GGUF type {qtype}")


class GroupedInt8Linear(nn.Module):
    """y = x @ W.T with W = q * scale (+ zero) per group of `group` columns: q int8 (out, in),
    scale / zero float32 (out, in / group). Dequantized per call (a GPU's int8 path)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group = group
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)

    def dequantize(self) -> torch.Tensor:
        w = self.q.float().view(self.out_features, -1, self.group) * self.scale[..., None]
        if self.zero is not None:
            w = w + self.zero[..., None]
        return w.view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize().to(x.dtype))


def padded_k(in_features: int) -> int:
    """Rows of torch's int4 kernel hold a multiple of 1024 weights (its 8 warps x 8 k-tiles of
    16), so shorter ones are padded with zero weights, as gpt-fast does."""
    return -(-in_features // 1024) * 1024


class Int4PackLinear(nn.Module):
    """y = x @ W.T on torch's tile-packed int4 kernel (CUDA, bfloat16): W = (q - 8) * scale +
    zero per group of 32, `packed` made on the device it runs on (the packing depends on it);
    rows padded to padded_k columns of zero weight."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = q.shape
        pad = padded_k(self.in_features) - self.in_features
        q = F.pad(q.to(torch.int32), (0, pad), value=8)  # (8 - 8) * 0 + 0: zero weights
        scale, zero = F.pad(scale, (0, pad // BLOCK)), F.pad(zero, (0, pad // BLOCK))
        self.register_buffer(
            "packed",
            torch.ops.aten._convert_weight_to_int4pack(
                ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8), 8
            ),
        )
        # the kernel's zero is the weight at q = 8; (groups, out, 2) in bfloat16
        self.register_buffer(
            "scales_zeros",
            torch.stack([scale, zero + 8 * scale], dim=-1).transpose(0, 1).contiguous().bfloat16(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = F.pad(
            x.reshape(-1, self.in_features), (0, padded_k(self.in_features) - self.in_features)
        )
        out = torch.ops.aten._weight_int4pack_mm(x2d, self.packed, BLOCK, self.scales_zeros)
        return out.view(*x.shape[:-1], self.out_features)


def int4_packs(layer: PackedLinear, dtype: torch.dtype) -> bool:
    """Whether `layer` runs on torch's int4 kernel where it is (CUDA, bfloat16); otherwise it
    takes the int8 layout."""
    return (
        layer.qtype in INT4_TYPES and layer.data.device.type == "cuda" and dtype == torch.bfloat16
    )


def transcode(layer: PackedLinear, dtype: torch.dtype) -> nn.Module:
    """The GPU layout of a packed layer, made on the layer's device."""
    if int4_packs(layer, dtype):
        return Int4PackLinear(*int4_values(layer))
    return GroupedInt8Linear(*int8_values(layer))


def transcode_(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Replace every PackedLinear of `module` that is not on a CPU (the CPU kernels compute on
    the blocks themselves) by its GPU layout, in place; the blocks are then freed."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, PackedLinear) and child.data.device.type != "cpu":
                setattr(parent, name, transcode(child, dtype))
    return module


def transcoded_bytes(qtype: str, shape: tuple[int, int], dtype: torch.dtype) -> int:
    """Bytes the GPU layout of a (out, in) `qtype` matrix holds on CUDA computing in `dtype`."""
    out, cols = shape
    if qtype in INT4_TYPES and dtype == torch.bfloat16:
        cols = padded_k(cols)
        return out * cols // 2 + out * (cols // BLOCK) * 2 * 2  # int4, bf16 scale and zero
    group = 16 if qtype in ("Q6_K", "Q3_K", "Q2_K") else 32
    with_zero = qtype in ("Q4_1", "Q4_K", "Q5_1", "Q5_K", "Q2_K")
    return out * cols + out * (cols // group) * 4 * (2 if with_zero else 1)
