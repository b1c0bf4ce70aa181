"""SentencePiece `tokenizer.model` (Llama 1/2, llama2.c's `.model` files) via the sentencepiece library."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from ..errors import TokenizerError
from ..sniff import varint
from .base import split_special


class SentencePieceTokenizer:
    def __init__(self, path: str | Path, *, stop_ids: Iterable[int] = ()):
        self.path = Path(path)
        try:
            proto = self.path.read_bytes()
            self.sp = spm.SentencePieceProcessor(model_proto=proto)
        except (OSError, RuntimeError) as e:
            raise TokenizerError(
                f"{self.path} is not a readable SentencePiece model ({e}); restore it from the original checkpoint"
            ) from e
        sp = self.sp
        self.vocab_size: int = sp.vocab_size()
        self.bos_id: int | None = sp.bos_id() if sp.bos_id() >= 0 else None
        self.eos_id: int | None = sp.eos_id() if sp.eos_id() >= 0 else None
        self.pad_id: int = sp.pad_id()  # -1 when absent, as in Meta's Llama 2
        self.stop_ids = frozenset({self.eos_id} - {None}) | frozenset(stop_ids)
        self.add_bos = self.bos_id is not None
        self.adds_dummy_prefix = _add_dummy_prefix(proto)
        self._control = {sp.id_to_piece(i): i for i in range(self.vocab_size) if sp.is_control(i)}
        self._bytes: dict[int, bytes] = {}

    def encode(
        self, text: str, *, bos: bool = True, eos: bool = False, special: bool = False
    ) -> list[int]:
        ids: list[int] = [self.bos_id] if bos and self.bos_id is not None else []
        if special and self._control:
            for part in split_special(text, self._control):
                ids += [self._control[part]] if part in self._control else self.sp.encode(part)
        else:
            ids += self.sp.encode(text)
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        # ids past the vocabulary (a model's padded embedding rows) have no text
        return self.sp.decode([i for i in map(int, ids) if 0 <= i < self.vocab_size])

    def token_bytes(self, token_id: int) -> bytes:
        cached = self._bytes.get(token_id)
        if cached is None:
            cached = self._bytes[token_id] = self._token_bytes(token_id)
        return cached

    def _token_bytes(self, token_id: int) -> bytes:
        sp = self.sp
        if not 0 <= token_id < self.vocab_size or sp.is_control(token_id):
            return b""
        piece = sp.id_to_piece(token_id)
        if sp.is_byte(token_id):  # "<0x0A>"
            return bytes([int(piece[3:5], 16)])
        if sp.is_unknown(token_id):
            return sp.decode([token_id]).encode()  # " ⁇ ", as decode() shows it
        return piece.replace("\u2581", " ").encode()

    def token_to_id(self, piece: str) -> int | None:
        token_id = self.sp.piece_to_id(piece)
        if token_id == self.sp.unk_id() and piece != self.sp.id_to_piece(token_id):
            return None
        return token_id


def _add_dummy_prefix(proto: bytes) -> bool:
    """NormalizerSpec.add_dummy_prefix (ModelProto field 3, its field 3; protobuf default true).
    Read from the raw protobuf because the sentencepiece wheel's model_pb2 needs `protobuf`."""
    spec = _field(proto, 3)
    if spec is None:
        return True
    value = _field(spec, 3, wire=0)
    return True if value is None else bool(value)


def _field(buf: bytes, number: int, wire: int = 2) -> bytes | int | None:
    """First occurrence of field `number` in a protobuf message (bytes for wire type 2, int for 0)."""
    i = 0
    try:
        while i < len(buf):
            key, i = varint(buf, i)
            field, kind = key >> 3, key & 7
            if kind == 0:
                value, i = varint(buf, i)
                if field == number and wire == 0:
                    return value
            elif kind == 2:
                n, i = varint(buf, i)
                if field == number and wire == 2:
                    return buf[i : i + n]
                i += n
            elif kind == 1:
                i += 8
            elif kind == 5:
                i += 4
            else:
                return None
    except ValueError:
        return None
    return None
