"""Tokenizers built from a GGUF file's `tokenizer.ggml.*` metadata.

- `llama`: SentencePiece BPE (tokens, scores, token types). The pieces are written into an in-memory
  SentencePiece ModelProto and encoded by `sentencepiece` itself, so ids equal SentencePiece's.
- `gpt2`: byte-level BPE with merges (SmolLM2, Llama 3), built with the `tokenizers` library: BPE model,
  the pre-tokenizer named by `tokenizer.ggml.pre`, and the ByteLevel alphabet.
Special tokens (CONTROL and USER_DEFINED) are parsed from text only when `encode(special=True)`.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Mapping
from itertools import repeat
from pathlib import Path
from typing import Any

import sentencepiece as spm
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from ..errors import TokenizerError
from .base import END_OF_TEXT, END_OF_TURN

# GGUF token types (llama.cpp's llama_token_type; the same numbers as SentencePiece's piece types)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# GPT-2 style pre-tokenizer regexes by `tokenizer.ggml.pre` (the same patterns as llama.cpp's vocab).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = ("default", "gpt2", "llama-bpe", "llama3", "smollm")


class GGUFTokenizer:
    """A tokenizer from GGUF metadata; satisfies the `Tokenizer` protocol."""

    def __init__(
        self,
        model: str,
        tokens: list[str],
        token_types: list[int],
        meta: Mapping[str, Any],
        path: Path,
    ):
        self.kind = model
        self.pieces = tokens
        self.token_types = token_types
        self.vocab_size = len(tokens)

        def token_id(key: str) -> int | None:
            value = meta.get(f"tokenizer.ggml.{key}")
            return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

        self.bos_id = token_id("bos_token_id")
        self.eos_id = token_id("eos_token_id")
        pad = token_id("padding_token_id")
        self.pad_id = -1 if pad is None else pad
        self.add_bos = (
            bool(meta.get("tokenizer.ggml.add_bos_token", model == "llama"))
            and self.bos_id is not None
        )
        self.add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
        # the tokens that are not NORMAL, found once: the passes below look at these few only
        # (each pass over 49k-256k tokens in Python costs ~10 ms of every load)
        odd = [i for i, kind in enumerate(token_types) if kind != NORMAL]
        ends = frozenset(END_OF_TURN + END_OF_TEXT)
        ids = {self.eos_id, token_id("eot_token_id"), token_id("eom_token_id")}
        ids |= {i for i in odd if token_types[i] in (CONTROL, USER_DEFINED) and tokens[i] in ends}
        self.stop_ids = frozenset(i for i in ids if i is not None)
        # each text's first id (as dict.setdefault in order): filled last to first
        self._ids = dict(zip(reversed(tokens), range(len(tokens) - 1, -1, -1)))
        # CONTROL tokens are parsed from text only with special=True; USER_DEFINED ones always (as
        # llama.cpp and transformers' added tokens do). SentencePiece matches USER_DEFINED itself.
        self._special_re = _alternation(tokens, token_types, odd, (CONTROL, USER_DEFINED))
        self._user_re = (
            _alternation(tokens, token_types, odd, (USER_DEFINED,)) if model == "gpt2" else None
        )
        if model == "llama":
            self.adds_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
            scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
            self._sp = _sentencepiece(
                tokens, scores, token_types, self, path, dummy_prefix=self.adds_dummy_prefix
            )
            self._byte_of = {
                i: bytes([int(tokens[i][3:5], 16)])
                for i in odd
                if token_types[i] == BYTE and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", tokens[i])
            }
        elif model == "gpt2":
            self.adds_dummy_prefix = False
            self._bpe = _byte_level_bpe(self._ids, meta, path)
            self._unicode_to_byte = {c: b for b, c in _bytes_to_unicode().items()}
        else:
            raise TokenizerError(
                f"{path} has a tokenizer of kind {model!r} (tokenizer.ggml.model); llamarun supports 'llama' (SentencePiece) and 'gpt2' (byte-level BPE)"
            )

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], path: Path) -> GGUFTokenizer | None:
        """The file's tokenizer, or None when the GGUF carries no vocabulary."""
        model = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if model is None or not tokens:
            return None
        types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
        if len(types) != len(tokens):
            raise TokenizerError(
                f"{path} has {len(tokens)} tokens but {len(types)} token types: the vocabulary metadata is corrupt"
            )
        return cls(model, list(tokens), list(map(int, types)), meta, path)

    def encode(
        self, text: str, *, bos: bool = True, eos: bool = False, special: bool = False
    ) -> list[int]:
        """Text -> ids. `special=True` parses special-token text such as `<|im_end|>` into its id."""
        ids: list[int] = [self.bos_id] if bos and self.bos_id is not None else []
        start = 0
        chunks: list[tuple[str, int | None]] = []
        pattern = self._special_re if special else self._user_re
        if pattern is not None:
            for m in pattern.finditer(text):
                chunks.append((text[start : m.start()], self._ids[m.group()]))
                start = m.end()
        chunks.append((text[start:], None))
        for chunk, special_id in chunks:
            if chunk:
                ids += self._encode_plain(chunk)
            if special_id is not None:
                ids.append(special_id)
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        if self.kind == "llama":
            # each text piece gets SentencePiece's dummy prefix, after a special token too (as llama.cpp)
            return self._sp.encode(text)
        return self._bpe.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        ids = list(ids)
        text = b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")
        if (
            self.adds_dummy_prefix
            and text.startswith(" ")
            and ids
            and self.token_types[ids[0]] != BYTE
        ):
            text = text[1:]  # SentencePiece's dummy prefix
        return text

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of a token: b"" for control tokens, the byte for <0xNN>, ▁ as a space."""
        kind = self.token_types[token_id]
        piece = self.pieces[token_id]
        if kind in (CONTROL, UNKNOWN, UNUSED):
            return b""
        if kind == USER_DEFINED:
            return piece.encode("utf-8")
        if self.kind == "llama":
            if kind == BYTE and token_id in self._byte_of:
                return self._byte_of[token_id]
            return piece.replace("\u2581", " ").encode("utf-8")
        return bytes(self._unicode_to_byte.get(c, 0) for c in piece)

    def token_to_id(self, piece: str) -> int | None:
        return self._ids.get(piece)


def _alternation(
    tokens: list[str], types: list[int], among: list[int], kinds: tuple[int, ...]
) -> re.Pattern | None:
    """A regex matching any token (of ids `among`) of the given types, longest first; None when
    there is none."""
    texts = sorted(
        {tokens[i] for i in among if types[i] in kinds and tokens[i]}, key=len, reverse=True
    )
    return re.compile("|".join(map(re.escape, texts))) if texts else None


def _sentencepiece(
    tokens: list[str],
    scores: list[float],
    types: list[int],
    tok: GGUFTokenizer,
    path: Path,
    *,
    dummy_prefix: bool,
):
    """A SentencePieceProcessor over the file's pieces (a BPE ModelProto serialized here)."""
    unk = next((i for i, t in enumerate(types) if t == UNKNOWN), 0)
    proto = model_proto(
        tokens,
        scores,
        types,
        unk_id=unk,
        bos_id=tok.bos_id,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
        byte_fallback=BYTE in types,
        add_dummy_prefix=dummy_prefix,
    )
    try:
        return spm.SentencePieceProcessor(model_proto=proto)
    except (RuntimeError, OSError) as e:
        raise TokenizerError(
            f"the SentencePiece vocabulary in {path} is invalid ({e}); the file may be corrupt"
        ) from e


def model_proto(
    tokens: list[str],
    scores: list[float],
    types: list[int],
    *,
    unk_id: int,
    bos_id: int | None,
    eos_id: int | None,
    pad_id: int,
    byte_fallback: bool,
    add_dummy_prefix: bool,
) -> bytes:
    """Serialize a SentencePiece ModelProto (sentencepiece_model.proto field numbers).

    Written directly in protobuf wire format so no protobuf runtime is needed: ModelProto{1: pieces
    {1: piece, 2: score, 3: type}, 2: TrainerSpec, 3: NormalizerSpec}.
    """
    pieces = b"".join(map(_piece, tokens, scores, types))
    trainer = (
        _varint_field(
            3, 2
        )  # model_type BPE: llama.cpp's SPM merges the best-scoring pair first, as SentencePiece BPE
        + _varint_field(4, len(tokens))
        + _varint_field(35, int(byte_fallback))
        + _varint_field(40, unk_id)
        + _varint_field(41, -1 if bos_id is None else bos_id)
        + _varint_field(42, -1 if eos_id is None else eos_id)
        + _varint_field(43, pad_id)
    )
    normalizer = (
        _string(1, "identity")
        + _varint_field(3, int(add_dummy_prefix))
        + _varint_field(4, 0)
        + _varint_field(5, 1)
    )
    return pieces + _message(2, trainer) + _message(3, normalizer)


_SMALL = [bytes([i]) for i in range(128)]  # the one-byte varints
_SCORE = struct.Struct("<f").pack


def _piece(text: str, score: float, kind: int) -> bytes:
    """ModelProto field 1, one SentencePiece {1: piece, 2: score, 3: type}: as _message(1,
    _string(1, text) + ...) but with one-byte lengths looked up, run once per token (32k-256k)."""
    raw = text.encode("utf-8")
    n = len(raw)
    body = (
        b"\n"
        + (_SMALL[n] if n < 128 else _varint(n))
        + raw
        + b"\x15"
        + _SCORE(score)
        + b"\x18"
        + (_SMALL[kind] if 0 <= kind < 128 else _varint(kind))
    )
    m = len(body)
    return b"\n" + (_SMALL[m] if m < 128 else _varint(m)) + body


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32 values are encoded as 64-bit two's complement
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _varint_field(field: int, value: int) -> bytes:
    return _key(field, 0) + _varint(value)


def _message(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def _string(field: int, text: str) -> bytes:
    return _message(field, text.encode("utf-8"))


def _byte_level_bpe(vocab: dict[str, int], meta: Mapping[str, Any], path: Path):
    """A `tokenizers.Tokenizer`: BPE over the GPT-2 byte alphabet (vocab: each token's first id),
    split by the file's pre-tokenizer."""
    texts = meta.get("tokenizer.ggml.merges") or []
    merges = list(map(tuple, map(str.split, texts, repeat(" "), repeat(1))))
    if min(map(len, merges), default=2) != 2:
        raise TokenizerError(
            f"{path} has malformed BPE merges (tokenizer.ggml.merges entries must be 'left right')"
        )
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise TokenizerError(
            f"{path} asks for the pre-tokenizer {pre!r} (tokenizer.ggml.pre); llamarun knows {', '.join(PRE_TOKENIZERS)}"
        )
    llama3 = pre in ("llama-bpe", "llama3")
    # Llama 3 (tiktoken) takes a whole pre-token from the vocabulary before merging (ignore_merges)
    bpe = models.BPE(
        vocab=vocab, merges=merges, ignore_merges=llama3, fuse_unk=False, byte_fallback=False
    )
    tokenizer = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not llama3)
    if llama3:
        split = pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False)
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    elif pre == "smollm":  # digits one by one, then GPT-2's regex (SmolLM's tokenizer.json)
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (the ByteLevel alphabet)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping
