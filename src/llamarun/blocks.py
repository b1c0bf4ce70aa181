"""GGML's quantized block formats, in torch: their sizes and the dequantization of whole rows.

Each GGUF weight row is a run of blocks: 32 weights (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL) or
256 (the K-quants Q2_K..Q6_K and IQ4_XS) with float16 scales and packed integers. The layouts
follow ggml's ggml-common.h and are checked against gguf-py's numpy dequantization in the tests.
This is the reference the C++ kernels (csrc/gguf_blocks.h) are tested against and the path that
runs where they are not built; it never sees a file, only the bytes of rows.
"""

from __future__ import annotations

import torch

# type -> (weights per block, bytes per block)
BLOCK_SIZES = {
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q8_0": (32, 34),
    "Q2_K": (256, 84),
    "Q3_K": (256, 110),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
    "IQ4_NL": (32, 18),
    "IQ4_XS": (256, 136),
}
BLOCK_TYPES = tuple(BLOCK_SIZES)
# ggml's type ids (GGMLQuantizationType), which the C++ kernels take
TYPE_IDS = {
    "Q4_0": 2,
    "Q4_1": 3,
    "Q5_0": 6,
    "Q5_1": 7,
    "Q8_0": 8,
    "Q2_K": 10,
    "Q3_K": 11,
    "Q4_K": 12,
    "Q5_K": 13,
    "Q6_K": 14,
    "IQ4_NL": 20,
    "IQ4_XS": 23,
}
# the 4-bit non-linear codebook of IQ4_NL / IQ4_XS (ggml-common.h kvalues_iq4nl)
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def row_bytes(qtype: str, in_features: int) -> int:
    """Bytes one row of `in_features` weights takes in `qtype`."""
    size, nbytes = BLOCK_SIZES[qtype]
    return in_features // size * nbytes


def _f16(b: torch.Tensor, at: int) -> torch.Tensor:
    """(n, 1) float32 from the little-endian float16 at byte `at` of each block."""
    return b[:, at : at + 2].contiguous().view(torch.float16).float()


def _bits(b: torch.Tensor, shifts: tuple[int, ...], mask: int) -> torch.Tensor:
    """(n, m, k) -> (n, m, len(shifts), k): each byte shifted right by each shift, masked."""
    s = torch.tensor(shifts, dtype=torch.uint8, device=b.device).view(1, 1, -1, 1)
    return (b.unsqueeze(2) >> s) & mask


def _nibbles32(qs: torch.Tensor) -> torch.Tensor:
    """(n, 16) bytes -> (n, 32) of 0..15: low nibbles are weights 0..15, high ones 16..31."""
    return torch.cat([qs & 15, qs >> 4], dim=1)


def _high_bits32(qh: torch.Tensor) -> torch.Tensor:
    """(n, 4) bytes of a little-endian uint32 -> (n, 32) bits, bit i for weight i."""
    return _bits(qh.unsqueeze(-1), tuple(range(8)), 1).reshape(-1, 32)  # byte-major


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes -> eight 6-bit scales and eight 6-bit mins, each (n, 8)."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scales = torch.cat([d & 63, (md & 15) | ((d >> 2) & 48)], dim=1)
    mins = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], dim=1)
    return scales.float(), mins.float()


def _iq4(q: torch.Tensor) -> torch.Tensor:
    return torch.tensor(IQ4_VALUES, dtype=torch.float32, device=q.device)[q.long()]


def _q4_0(b):
    return _f16(b, 0) * (_nibbles32(b[:, 2:18]).float() - 8)


def _q4_1(b):
    return _f16(b, 0) * _nibbles32(b[:, 4:20]).float() + _f16(b, 2)


def _q5_0(b):
    q = _nibbles32(b[:, 6:22]) | (_high_bits32(b[:, 2:6]) << 4)
    return _f16(b, 0) * (q.float() - 16)


def _q5_1(b):
    q = _nibbles32(b[:, 8:24]) | (_high_bits32(b[:, 4:8]) << 4)
    return _f16(b, 0) * q.float() + _f16(b, 2)


def _q8_0(b):
    return _f16(b, 0) * b[:, 2:34].contiguous().view(torch.int8).float()


def _q2_k(b):
    n = b.shape[0]
    sc = b[:, 0:16]
    q = _bits(b[:, 16:80].reshape(n, 2, 32), (0, 2, 4, 6), 3).reshape(n, 16, 16).float()
    dl = (_f16(b, 80) * (sc & 15).float()).unsqueeze(-1)
    ml = (_f16(b, 82) * (sc >> 4).float()).unsqueeze(-1)
    return (dl * q - ml).reshape(n, 256)


def _q3_k(b):
    n = b.shape[0]
    s = b[:, 96:108]
    low = _bits(s[:, 0:8].reshape(n, 1, 8), (0, 4), 15).reshape(n, 16)
    high = _bits(s[:, 8:12].reshape(n, 1, 4), (0, 2, 4, 6), 3).reshape(n, 16)
    sc = (low | (high << 4)).float() - 32
    ql = _bits(b[:, 32:96].reshape(n, 2, 32), (0, 2, 4, 6), 3).reshape(n, 16, 16)
    qh = _bits(b[:, 0:32].reshape(n, 1, 32), tuple(range(8)), 1).reshape(n, 16, 16)
    q = ql.float() - 4 * (1 - qh.float())  # the high bit *clear* means minus 4
    return ((_f16(b, 108) * sc).unsqueeze(-1) * q).reshape(n, 256)


def _q4_k(b):
    n = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])
    q = _bits(b[:, 16:144].reshape(n, 4, 32), (0, 4), 15).reshape(n, 8, 32).float()
    d, dmin = _f16(b, 0), _f16(b, 2)
    return ((d * sc).unsqueeze(-1) * q - (dmin * mn).unsqueeze(-1)).reshape(n, 256)


def _q5_k(b):
    n = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])
    ql = _bits(b[:, 48:176].reshape(n, 4, 32), (0, 4), 15).reshape(n, 8, 32)
    qh = _bits(b[:, 16:48].reshape(n, 1, 32), tuple(range(8)), 1).reshape(n, 8, 32)
    q = (ql | (qh << 4)).float()
    d, dmin = _f16(b, 0), _f16(b, 2)
    return ((d * sc).unsqueeze(-1) * q - (dmin * mn).unsqueeze(-1)).reshape(n, 256)


def _q6_k(b):
    n = b.shape[0]
    ql = _bits(b[:, 0:128].reshape(n, 2, 64), (0, 4), 15).reshape(n, 8, 32)
    qh = _bits(b[:, 128:192].reshape(n, 2, 32), (0, 2, 4, 6), 3).reshape(n, 8, 32)
    q = (ql | (qh << 4)).float().reshape(n, 16, 16) - 32
    sc = b[:, 192:208].contiguous().view(torch.int8).float()
    return ((_f16(b, 208) * sc).unsqueeze(-1) * q).reshape(n, 256)


def _iq4_nl(b):
    return _f16(b, 0) * _iq4(_nibbles32(b[:, 2:18]))


def _iq4_xs(b):
    n = b.shape[0]
    high = b[:, 2].int() | (b[:, 3].int() << 8)  # scales_h, a little-endian uint16
    shifts = torch.arange(0, 16, 2, device=b.device, dtype=torch.int32)
    sh = ((high.unsqueeze(1) >> shifts) & 3).to(torch.uint8)
    sl = _bits(b[:, 4:8].reshape(n, 4, 1), (0, 4), 15).reshape(n, 8)
    sc = (sl | (sh << 4)).float() - 32
    q = _bits(b[:, 8:136].reshape(n, 8, 16), (0, 4), 15).reshape(n, 8, 32)
    return ((_f16(b, 0) * sc).unsqueeze(-1) * _iq4(q)).reshape(n, 256)


_DEQUANTIZE = {
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q8_0": _q8_0,
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
    "IQ4_NL": _iq4_nl,
    "IQ4_XS": _iq4_xs,
}


def dequantize_rows(data: torch.Tensor, qtype: str, in_features: int) -> torch.Tensor:
    """float32 (rows, in_features) from uint8 `data` (rows, row_bytes) holding `qtype` blocks."""
    size, nbytes = BLOCK_SIZES[qtype]
    rows = data.shape[0]
    blocks = data.reshape(rows * (in_features // size), nbytes)
    return _DEQUANTIZE[qtype](blocks).reshape(rows, in_features)
