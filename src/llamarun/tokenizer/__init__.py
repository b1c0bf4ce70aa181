"""Tokenizers: one protocol, one implementation per file kind, chosen by file contents.

Kinds: SentencePiece `tokenizer.model`, Llama 3 tiktoken rank file, Hugging Face `tokenizer.json`,
llama2.c `tokenizer.bin`, and GGUF metadata (built in loaders/gguf.py via tokenizer/gguf.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int  # -1 when the vocabulary has none (as Meta's reference)
    stop_ids: frozenset[
        int
    ]  # every id that ends generation (llama3: <|end_of_text|> and <|eot_id|>)
    add_bos: bool  # whether prompts start with BOS by default
    adds_dummy_prefix: bool  # SentencePiece-style: decode() drops the leading space of the text

    def encode(
        self, text: str, *, bos: bool = True, eos: bool = False, special: bool = False
    ) -> list[int]:
        """Text -> ids. `special=True` parses special-token text such as `<|eot_id|>` into its id."""

    def decode(self, ids: Iterable[int]) -> str: ...

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (b"" for control tokens such as BOS)."""

    def token_to_id(self, piece: str) -> int | None:
        """Id of a token given its exact text (e.g. "<|im_end|>"), or None."""


# Preference when a folder holds several tokenizer files (the richest description first).
KINDS = ("hf", "sentencepiece", "tiktoken", "llama2c")
_MAX_TOKENIZER_BYTES = 256 << 20  # larger files are weights, not tokenizers: skip them unread


def load_tokenizer(path: str | Path, *, stop_ids: Iterable[int] = ()) -> Tokenizer:
    """Load the tokenizer file at `path`, recognised by its contents (a folder: the best one in it).

    stop_ids: extra ids that end generation (e.g. config.json's `eos_token_id`).
    """
    from ..errors import TokenizerError

    path = Path(path).expanduser()
    if not path.exists():
        raise TokenizerError(
            f"tokenizer {path} does not exist: give the path of a tokenizer file or of the folder holding it"
        )
    if path.is_dir():
        tok = find_tokenizer(path, stop_ids=stop_ids)
        if tok is None:
            raise TokenizerError(
                f"No tokenizer found in {path}: looked for a Hugging Face tokenizer.json, a SentencePiece "
                "model, a tiktoken rank file (Llama 3 tokenizer.model) and a llama2.c tokenizer.bin; "
                "pass the tokenizer file with --tokenizer"
            )
        return tok
    kind = sniff_tokenizer(path)
    if kind is None:
        raise TokenizerError(
            f"{path} is not a tokenizer llamarun can read: it is not a Hugging Face tokenizer.json, a "
            "SentencePiece model, a tiktoken rank file or a llama2.c tokenizer.bin"
        )
    return _build(kind, path, stop_ids)


def find_tokenizer(
    directory: Path, vocab_size: int | None = None, *, stop_ids: Iterable[int] = ()
) -> Tokenizer | None:
    """The tokenizer among the files of `directory`, chosen by contents, or None when there is none.

    Preference: one whose vocabulary fits `vocab_size` (exactly, then smaller), then by kind:
    tokenizer.json > SentencePiece > tiktoken > llama2.c .bin. A file that claims to be a
    tokenizer but is unreadable raises TokenizerError when nothing else fits.
    """
    from ..errors import TokenizerError

    directory = Path(directory)
    stop_ids = _as_ids(stop_ids)
    loaded: list[Tokenizer] = []
    error: TokenizerError | None = None
    for p, kind in tokenizer_files(directory):
        try:
            tok = _build(kind, p, stop_ids)
        except TokenizerError as e:
            error = error or e
            continue
        if vocab_size is None or tok.vocab_size == vocab_size:
            return tok
        loaded.append(tok)
    fitting = [t for t in loaded if t.vocab_size <= vocab_size] if vocab_size else []
    if fitting or loaded:
        return (fitting or loaded)[0]  # a misfit still loads, so the caller can name the mismatch
    if error is not None:
        raise error
    return None


def tokenizer_files(directory: Path) -> list[tuple[Path, str]]:
    """The tokenizer files in `directory` with their kinds, by contents, in KINDS' preference order."""
    found = []
    for p in sorted(Path(directory).iterdir()):
        kind = sniff_tokenizer(p) if p.is_file() else None
        if kind is not None:
            found.append((p, kind))
    return sorted(found, key=lambda item: KINDS.index(item[1]))


def sniff_tokenizer(path: Path) -> str | None:
    """Kind of tokenizer file at `path` ("hf", "sentencepiece", "tiktoken", "llama2c") or None,
    from its first bytes; weights files (GGUF, safetensors, zip/pickle, llama2.c models) are
    recognised and skipped without reading them."""
    try:
        size = path.stat().st_size
        if size > _MAX_TOKENIZER_BYTES:
            return None
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if len(head) < 8:
        return None
    if head[:4] in (b"GGUF", b"PK\x03\x04") or head[:1] == b"\x80":  # GGUF, torch zip, pickle
        return None
    text = head.lstrip()
    if text[:1] == b"{":
        return "hf" if _is_hf_json(path, head, size) else None
    if _is_sentencepiece(head):
        return "sentencepiece"
    if _is_tiktoken(head, size):
        return "tiktoken"
    from .llama2c import is_llama2c_tokenizer

    if is_llama2c_tokenizer(path, head, size):
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
    import json

    try:
        data = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return (
        isinstance(data, dict) and isinstance(data.get("model"), dict) and "vocab" in data["model"]
    )


def _varint(buf: bytes, i: int) -> tuple[int, int]:
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
        n, i = _varint(head, 1)
        if head[i] != 0x0A:
            return False
        m, j = _varint(head, i + 1)
        end = j + m
        if m > n or end > i + n or end >= len(head):
            return False
        head[j:end].decode("utf-8")
        return end == i + n or head[end] in (0x15, 0x18)
    except (ValueError, IndexError, UnicodeDecodeError):
        return False


def _is_tiktoken(head: bytes, size: int) -> bool:
    import re

    lines = head.split(b"\n")
    if size > len(head):
        lines = lines[:-1]  # the last one may be cut off
    lines = [ln for ln in lines if ln]
    return bool(lines) and all(re.fullmatch(rb"[A-Za-z0-9+/]+=* \d+\r?", ln) for ln in lines[:64])


def _build(kind: str, path: Path, stop_ids: Iterable[int] | int) -> Tokenizer:
    if kind == "hf":
        from .hf import HFTokenizer as cls
    elif kind == "sentencepiece":
        from .sentencepiece import SentencePieceTokenizer as cls
    elif kind == "tiktoken":
        from .tiktoken import TiktokenTokenizer as cls
    else:
        from .llama2c import Llama2cTokenizer as cls
    return cls(path, stop_ids=_as_ids(stop_ids))


def _as_ids(ids: Iterable[int] | int) -> tuple[int, ...]:
    return (ids,) if isinstance(ids, int) else tuple(ids)  # config.json's eos_token_id: int or list


def split_special(text: str, specials: Iterable[str]) -> list[str]:
    """`text` cut around every occurrence of the given special-token strings (longest first);
    the specials themselves are list items of their own."""
    import re

    names = sorted(set(specials), key=len, reverse=True)
    if not names:
        return [text]
    pattern = "(" + "|".join(re.escape(n) for n in names) + ")"
    return [part for part in re.split(pattern, text) if part]
