"""The GGUF container: header, metadata and tensor table, with the tensor data memory-mapped.

Read directly rather than with gguf-py's GGUFReader, which builds a numpy view for every string
of every metadata array: on SmolLM2 (49k tokens, 48k merges) it took 1.4 s here against 0.05 s
for this reader, and the memory plan, `llamarun info` and every load read the header. gguf-py
still supplies the type tables (GGMLQuantizationType, GGML_QUANT_SIZES) and, in the tests, the
reference dequantization. Layout (ggml's docs/gguf.md): magic, uint32 version, uint64 tensor and
key/value counts, the key/values, the tensor infos, padding to `general.alignment`, the data.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import CheckpointError

SUPPORTED_VERSIONS = (2, 3)
# GGUF value types: 0..7 and 10..12 scalars (struct format), 8 string, 9 array.
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order: innermost (in_features) first
    type: GGMLQuantizationType
    offset: int  # absolute position of the data in the file
    n_bytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """PyTorch order: (out_features, in_features) for a matrix."""
        return tuple(reversed(self.dims))

    @property
    def type_name(self) -> str:
        return self.type.name


class GGUFFile:
    """A parsed GGUF file: `meta` (arrays as lists), `tensors` by name, and `data(t)` views."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
        if head[:4] != b"GGUF":
            raise CheckpointError(
                f"{self.path} is not a GGUF file: it starts with {head[:4]!r}, not the magic b'GGUF'. "
                "The download may be incomplete or the file is another format."
            )
        self.version = int.from_bytes(head[4:8], "little") if len(head) == 8 else None
        if self.version not in SUPPORTED_VERSIONS:
            raise CheckpointError(
                f"{self.path} is GGUF version {self.version}; llamarun reads versions 2 and 3 "
                "(version 1 files are obsolete: convert the model again with a current llama.cpp)."
            )
        # a plain ndarray over the map: slicing the memmap subclass runs __array_finalize__ each time
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="r").view(np.ndarray)
        try:
            self.meta, self.tensors = self._parse(memoryview(self._mm))
        except (struct.error, ValueError, IndexError, KeyError, UnicodeDecodeError) as e:
            raise CheckpointError(
                f"{self.path} is a truncated or corrupt GGUF file ({self.size} bytes; the reader "
                f"stopped with: {e}). Download it again (llamarun rm NAME && llamarun pull NAME "
                "for catalogue models)."
            ) from e
        for t in self.tensors.values():
            block = GGML_QUANT_SIZES[t.type][0]
            if not t.dims or t.dims[0] % block:
                raise CheckpointError(
                    f"{self.path} is corrupt: tensor {t.name} has rows of {t.dims[0] if t.dims else 0} "
                    f"{t.type_name} weights, not a whole number of its {block}-weight blocks. "
                    "Download it again, or convert the model again."
                )
            if t.offset + t.n_bytes > self.size:
                raise CheckpointError(
                    f"{self.path} is truncated: tensor {t.name} ends at byte {t.offset + t.n_bytes} "
                    f"but the file has {self.size} bytes. Download it again."
                )

    def _parse(self, buf: memoryview) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
        pos = 8

        def scalar(fmt: str):
            nonlocal pos
            (value,) = struct.unpack_from("<" + fmt, buf, pos)
            pos += struct.calcsize(fmt)
            return value

        def string() -> str:
            nonlocal pos
            n = scalar("Q")
            if pos + n > len(buf):
                raise ValueError(f"a string of {n} bytes at byte {pos} runs past the end")
            text = bytes(buf[pos : pos + n]).decode("utf-8", errors="replace")
            pos += n
            return text

        def strings(count: int) -> list[str]:
            # a vocabulary (49k tokens and 48k merges on SmolLM2) in one tight loop: through
            # string() it was most of a load's header time
            nonlocal pos
            out, end, length = [], len(buf), _U64.unpack_from
            add = out.append
            for _ in range(count):
                (n,) = length(buf, pos)
                pos += 8
                if pos + n > end:
                    raise ValueError(f"a string of {n} bytes at byte {pos} runs past the end")
                add(str(buf[pos : pos + n], "utf-8", "replace"))
                pos += n
            return out

        def value(vtype: int):
            nonlocal pos
            if vtype == _STRING:
                return string()
            if vtype == _ARRAY:
                item, count = scalar("I"), scalar("Q")
                if item in _SCALARS:  # one numpy read for the whole array
                    dtype = np.dtype("<" + _SCALARS[item])
                    if pos + count * dtype.itemsize > len(buf):
                        raise ValueError(f"an array of {count} values runs past the end")
                    out = np.frombuffer(buf, dtype, count, pos).tolist()
                    pos += count * dtype.itemsize
                    return out
                if item == _STRING:
                    return strings(count)
                return [value(item) for _ in range(count)]
            if vtype not in _SCALARS:
                raise ValueError(f"unknown GGUF value type {vtype}")
            return scalar(_SCALARS[vtype])

        n_tensors, n_kv = scalar("Q"), scalar("Q")
        meta = {}
        for _ in range(n_kv):
            key = string()
            meta[key] = value(scalar("I"))
        infos = []
        for _ in range(n_tensors):
            name = string()
            dims = tuple(scalar("Q") for _ in range(scalar("I")))
            infos.append((name, dims, GGMLQuantizationType(scalar("I")), scalar("Q")))
        align = int(meta.get("general.alignment", 32))
        data_start = -(-pos // align) * align
        tensors = {}
        for name, dims, qtype, offset in infos:
            block, type_size = GGML_QUANT_SIZES[qtype]
            n_bytes = math.prod(dims) // block * type_size
            tensors[name] = TensorInfo(name, dims, qtype, data_start + offset, n_bytes)
        return meta, tensors

    def data(self, t: TensorInfo) -> np.ndarray:
        """The tensor's bytes as a read-only view of the mapped file: float types as their dtype
        in PyTorch's shape, block types as uint8 (rows, bytes per row)."""
        raw = self._mm[t.offset : t.offset + t.n_bytes]
        floats = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
        if t.type_name in floats:
            return raw.view(floats[t.type_name]).reshape(t.shape)
        rows = math.prod(t.dims[1:])
        return raw.reshape(rows, -1)
