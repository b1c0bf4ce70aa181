"""What a path is, judged from its bytes: which checkpoint format (Meta or Hugging Face folder,
GGUF, llama2.c v0/v1/v2) and which tokenizer kind. Never from names (STYLE 2.4), and without
reading weights or building anything: every loader and tokenizer asks here first.

The llama2.c header is read here and only here: a legacy (v0) file has no magic, so "is this a
llama2.c model?" means "do its first 28 bytes describe a model of exactly this file's size?".
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError

FORMATS = ("meta", "hf", "gguf", "llama2c")
GGUF_MAGIC = b"GGUF"
LLAMA2C_MAGIC = 0x616B3432  # "ak42", llama2.c export.py versions 1 and 2
LLAMA2C_V1_HEADER_BYTES = 256
TOKENIZER_KINDS = ("hf", "sentencepiece", "tiktoken", "llama2c")  # preferred first
MAX_TOKENIZER_BYTES = 256 << 20  # larger files are weights, not tokenizers: skip them unread


def read_head(path: Path, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


# ---- llama2.c ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Llama2cHeader:
    """The header of a llama2.c checkpoint. v0: 7 int32 (vocab < 0: an unshared classifier);
    v1/v2: magic, version, the 7 int32, a shared-classifier byte, (v2) the int32 group size."""

    version: int  # 0 (legacy run.c), 1 (fp32) or 2 (Q8_0 groups)
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int  # as stored: a v0 file writes it negative when the classifier is unshared
    seq_len: int
    shared: bool
    group_size: int = 0

    @property
    def fields(self) -> tuple[int, int, int, int, int, int, int]:
        """dim, hidden_dim, n_layers, n_heads, n_kv_heads, |vocab_size|, seq_len."""
        return (self.dim, self.hidden_dim, self.n_layers, self.n_heads, self.n_kv_heads,
                abs(self.vocab_size), self.seq_len)  # fmt: skip

    def plausible(self, max_dim: int = 1 << 16) -> bool:
        """Positive sizes that divide as attention needs, none absurdly large."""
        dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = self.fields
        if min(dim, hidden, n_layers, n_heads, n_kv_heads, seq_len, vocab) <= 0:
            return False
        if dim % n_heads or n_heads % n_kv_heads:
            return False
        return dim <= max_dim and max(hidden, vocab, seq_len) <= 1 << 20 and n_layers <= 1 << 10


def llama2c_header(head: bytes) -> Llama2cHeader | None:
    """The header in a file's first bytes (at least 28; 41 for v1/v2), or None when too short."""
    if len(head) >= 41 and struct.unpack_from("<I", head)[0] == LLAMA2C_MAGIC:
        version = struct.unpack_from("<i", head, 4)[0]
        fields = struct.unpack_from("<7i", head, 8)
        group = struct.unpack_from("<i", head, 37)[0] if version == 2 else 0
        return Llama2cHeader(version, *fields, shared=bool(head[36]), group_size=group)
    if len(head) >= 28:
        fields = struct.unpack_from("<7i", head)
        return Llama2cHeader(0, *fields, shared=fields[5] > 0)
    return None


def llama2c_numels(
    dim: int, hidden: int, n_layers: int, n_heads: int, n_kv_heads: int, vocab: int
) -> tuple[int, int, int]:
    """(norm floats, matrix floats without the classifier, classifier floats)."""
    head = dim // n_heads
    norms = 2 * n_layers * dim + dim
    per_layer = dim * (2 * n_heads * head + 2 * n_kv_heads * head) + 3 * dim * hidden
    return norms, vocab * dim + n_layers * per_layer, vocab * dim


def expected_v0_size(
    dim: int, hidden: int, n_layers: int, n_heads: int, n_kv_heads: int, vocab: int, seq_len: int
) -> set[int]:
    """Valid byte sizes of a legacy (v0) file with these header values: {shared classifier, unshared}."""
    norms, matrices, classifier = llama2c_numels(dim, hidden, n_layers, n_heads, n_kv_heads, vocab)
    rope = seq_len * (dim // n_heads)  # cos and sin tables, seq_len * head_dim / 2 each
    shared = 28 + 4 * (norms + matrices + rope)
    return {shared, shared + 4 * classifier}


def v0_size(header: Llama2cHeader) -> int:
    """The byte size a legacy file with this header must have."""
    shared, unshared = sorted(expected_v0_size(*header.fields))
    return shared if header.vocab_size > 0 else unshared


def is_llama2c_model(path: Path, head: bytes | None = None) -> bool:
    """A v1/v2 file (magic), or a v0 header whose model is exactly the file's size."""
    head = read_head(path, 41) if head is None else head
    if len(head) >= 4 and struct.unpack_from("<I", head)[0] == LLAMA2C_MAGIC:
        return True  # the loader names what is wrong with a damaged or truncated one
    header = llama2c_header(head)
    if header is None or not header.plausible():
        return False
    return path.stat().st_size in expected_v0_size(*header.fields)


def llama2c_model_files(directory: Path) -> list[Path]:
    """The llama2.c checkpoints in a folder (a tokenizer.bin beside them is not one)."""
    return [
        p
        for p in sorted(directory.iterdir())
        if p.is_file() and p.stat().st_size >= 28 and is_llama2c_model(p)
    ]


def gguf_files(directory: Path) -> list[Path]:
    return [p for p in sorted(directory.iterdir()) if p.is_file() and read_head(p, 4) == GGUF_MAGIC]


_FILES = {"gguf": gguf_files, "llama2c": llama2c_model_files}


def checkpoint_file(path: Path, fmt: str) -> Path:
    """The file of a single-file format ("gguf", "llama2c"): `path` itself, or the one such file
    in the folder `path`."""
    if not path.is_dir():
        return path
    files = _FILES[fmt](path)
    if len(files) != 1:
        names = ", ".join(p.name for p in files) or "none"
        raise CheckpointError(
            f"{path} holds {len(files)} {fmt} checkpoints ({names}): give the file itself"
        )
    return files[0]


# ---- checkpoint formats --------------------------------------------------------------------


def detect_format(path: str | Path) -> str:
    """Name of the checkpoint format at `path` (one of FORMATS), judged by contents."""
    return locate(path)[0]


def locate(path: str | Path) -> tuple[str, Path]:
    """(format, what to read): the folder for Meta and Hugging Face checkpoints, the file itself
    for GGUF and llama2.c (also when given the folder that holds exactly one)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"{path} does not exist: give a checkpoint folder or file (or a catalogue name; see `llamarun list`)"
        )
    if path.is_dir():
        if (path / "params.json").is_file() and any(path.glob("consolidated.*.pth")):
            return "meta", path
        if (path / "config.json").is_file() and (
            any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))
        ):
            return "hf", path
        for fmt in ("gguf", "llama2c"):
            if _FILES[fmt](path):
                return fmt, checkpoint_file(path, fmt)
        raise CheckpointError(
            f"No checkpoint found in {path}: expected params.json with consolidated.*.pth (Meta), "
            "config.json with *.safetensors or pytorch_model*.bin (Hugging Face), a .gguf file, "
            "or a llama2.c .bin file. Point llamarun at the checkpoint folder or file itself."
        )
    head = read_head(path, 41)
    if head[:4] == GGUF_MAGIC:
        return "gguf", path
    if is_llama2c_model(path, head):
        return "llama2c", path
    header = llama2c_header(head)
    if header is not None and header.plausible(1 << 20):
        size, expected = path.stat().st_size, v0_size(header)
        problem = "is truncated" if size < expected else "is longer than its header says"
        raise CheckpointError(
            f"{path} {problem}: the legacy llama2.c (v0) header implies {expected} bytes but the "
            f"file has {size}; re-download or re-export it"
        )
    raise CheckpointError(
        f"{path} is not a checkpoint llamarun can read: it is neither GGUF (magic 'GGUF'), nor a "
        "llama2.c .bin (a 7-int header consistent with the file size). For a Meta or Hugging Face "
        "checkpoint, give its folder instead."
    )


# ---- tokenizer files -----------------------------------------------------------------------


def tokenizer_files(directory: Path) -> list[tuple[Path, str]]:
    """The tokenizer files in `directory` with their kinds, in TOKENIZER_KINDS' preference order."""
    found = []
    for p in sorted(Path(directory).iterdir()):
        kind = sniff_tokenizer(p) if p.is_file() else None
        if kind is not None:
            found.append((p, kind))
    return sorted(found, key=lambda item: TOKENIZER_KINDS.index(item[1]))


def sniff_tokenizer(path: Path) -> str | None:
    """Kind of tokenizer file at `path` ("hf", "sentencepiece", "tiktoken", "llama2c") or None,
    from its first bytes; weights files (GGUF, safetensors, zip/pickle, llama2.c models) are
    recognised and skipped without reading them."""
    try:
        size = path.stat().st_size
        if size > MAX_TOKENIZER_BYTES:
            return None
        head = read_head(path, 4096)
    except OSError:
        return None
    if len(head) < 8:
        return None
    if head[:4] in (GGUF_MAGIC, b"PK\x03\x04") or head[:1] == b"\x80":  # GGUF, torch zip, pickle
        return None
    if head.lstrip()[:1] == b"{":
        return "hf" if _is_hf_json(path, head, size) else None
    if _is_sentencepiece(head):
        return "sentencepiece"
    if _is_tiktoken(head, size):
        return "tiktoken"
    if _is_llama2c_tokenizer(path, head, size):
        return "llama2c"
    return None


def _is_hf_json(path: Path, head: bytes, size: int) -> bool:
    # `tokenizers` writes version, truncation, padding, added_tokens ... model; hand-written
    # files may not, so small JSON files are parsed to look for the "model" section.
    if any(
        k in head for k in (b'"truncation"', b'"added_tokens"', b'"pre_tokenizer"', b'"normalizer"')
    ):
        return True
    if size > 4 << 20:
        return False
    try:
        data = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return (
        isinstance(data, dict) and isinstance(data.get("model"), dict) and "vocab" in data["model"]
    )


def varint(buf: bytes, i: int) -> tuple[int, int]:
    """A protobuf varint at buf[i]: (value, index after it); ValueError when malformed."""
    value = shift = 0
    while i < len(buf):
        b = buf[i]
        value |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            return value, i
        shift += 7
        if shift > 63:
            break
    raise ValueError("bad varint")


def _is_sentencepiece(head: bytes) -> bool:
    # ModelProto starts with field 1 `pieces` (tag 0x0A), whose first field is the piece string
    # (tag 0x0A), followed by its score (float, tag 0x15) or type (varint, tag 0x18).
    try:
        if head[0] != 0x0A:
            return False
        n, i = varint(head, 1)
        if head[i] != 0x0A:
            return False
        m, j = varint(head, i + 1)
        end = j + m
        if m > n or end > i + n or end >= len(head):
            return False
        head[j:end].decode("utf-8")
        return end == i + n or head[end] in (0x15, 0x18)
    except (ValueError, IndexError, UnicodeDecodeError):
        return False


def _is_tiktoken(head: bytes, size: int) -> bool:
    lines = head.split(b"\n")
    if size > len(head):
        lines = lines[:-1]  # the last one may be cut off
    lines = [ln for ln in lines if ln]
    return bool(lines) and all(re.fullmatch(rb"[A-Za-z0-9+/]+=* \d+\r?", ln) for ln in lines[:64])


def _is_llama2c_tokenizer(path: Path, head: bytes, size: int) -> bool:
    """Whether a file's contents walk as a llama2.c tokenizer.bin (uint32 max_token_length, then
    per token float32 score, uint32 length, bytes) from end to end; model .bin files and anything
    else fail within the first few records."""
    if is_llama2c_model(path, head[:41]):
        return False
    max_len = struct.unpack_from("<I", head, 0)[0]
    if not 1 <= max_len <= 1024:
        return False
    i, count = 4, 0
    with open(path, "rb") as f:
        data = head
        f.seek(len(head))
        while i < size:
            if i + 8 > len(data) and len(data) < size:
                data += f.read(1 << 20)
            if i + 8 > len(data):
                return False
            _, n = struct.unpack_from("<fI", data, i)
            if n > max_len:
                return False
            i += 8 + n
            count += 1
    return i == size and count >= 3


_TOKENIZER_NAMES = {
    "hf": "Hugging Face tokenizers",
    "sentencepiece": "SentencePiece",
    "tiktoken": "tiktoken BPE ranks",
    "llama2c": "llama2.c vocabulary",
}


def describe_tokenizer_files(folder: Path) -> str | None:
    """Name the tokenizer file the loaders would prefer in `folder`, judged by contents."""
    if not folder.is_dir():
        return None
    files = tokenizer_files(folder)
    if not files:
        return None
    path, kind = files[0]
    return f"{_TOKENIZER_NAMES[kind]} ({path.name})"
