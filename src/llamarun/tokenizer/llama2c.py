"""llama2.c `tokenizer.bin`, read, encoded and decoded the way llama2.c's run.c does it.

File: uint32 max_token_length, then per token: float32 score, uint32 byte length, the bytes
(SentencePiece's '▁' already turned into ' '; BOS/EOS written as "\\n<s>\\n" / "\\n</s>\\n").
Ids follow SentencePiece: 0 <unk>, 1 BOS, 2 EOS, 3..258 the byte pieces <0x00>..<0xFF>.
"""

from __future__ import annotations

import heapq
import re
import struct
from collections.abc import Iterable
from pathlib import Path

from ..errors import TokenizerError
from .base import split_special

BOS, EOS = 1, 2
BYTE_OFFSET = 3  # run.c's byte fallback: byte b is token b + 3
_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")


def read_tokenizer_bin(data: bytes, where: str) -> tuple[list[bytes], list[float]]:
    """Pieces and scores of a tokenizer.bin; TokenizerError when the layout does not add up."""
    if len(data) < 4:
        raise TokenizerError(
            f"{where} is too short to be a llama2.c tokenizer.bin ({len(data)} bytes); restore it"
        )
    (max_len,) = struct.unpack_from("<I", data, 0)
    pieces: list[bytes] = []
    scores: list[float] = []
    i = 4
    while i < len(data):
        if i + 8 > len(data):
            raise TokenizerError(
                f"{where} ends inside token {len(pieces)} (truncated at {len(data)} bytes); restore it from the original"
            )
        score, n = struct.unpack_from("<fI", data, i)
        if n > max_len or i + 8 + n > len(data):
            raise TokenizerError(
                f"{where} is not a valid llama2.c tokenizer.bin: token {len(pieces)} claims {n} bytes "
                f"(max_token_length {max_len}, file size {len(data)}); restore it from the original"
            )
        pieces.append(data[i + 8 : i + 8 + n])
        scores.append(score)
        i += 8 + n
    if not pieces:
        raise TokenizerError(f"{where} holds no tokens; it is not a llama2.c tokenizer.bin")
    return pieces, scores


class Llama2cTokenizer:
    def __init__(self, path: str | Path, *, stop_ids: Iterable[int] = ()):
        self.path = Path(path)
        try:
            data = self.path.read_bytes()
        except OSError as e:
            raise TokenizerError(f"cannot read tokenizer {self.path} ({e})") from e
        self.pieces, self.scores = read_tokenizer_bin(data, str(self.path))
        self.vocab_size = len(self.pieces)
        if self.vocab_size < BYTE_OFFSET + 256:
            raise TokenizerError(
                f"{self.path} has {self.vocab_size} tokens, fewer than llama2.c's 3 + 256 byte tokens; it is not a llama2.c tokenizer.bin"
            )
        self.lookup = {p: i for i, p in reversed(list(enumerate(self.pieces)))}  # first id wins
        self.bos_id: int | None = BOS
        self.eos_id: int | None = EOS
        self.pad_id = -1
        self.stop_ids = frozenset({EOS}) | frozenset(stop_ids)
        self.add_bos = True
        self.adds_dummy_prefix = True
        self._bytes = [self._piece_bytes(i) for i in range(self.vocab_size)]

    def _piece_bytes(self, token_id: int) -> bytes:
        if token_id in (BOS, EOS):
            return b""
        m = _BYTE_PIECE.fullmatch(self.pieces[token_id])
        return bytes([int(m.group(1), 16)]) if m else self.pieces[token_id]

    def encode(
        self, text: str, *, bos: bool = True, eos: bool = False, special: bool = False
    ) -> list[int]:
        ids = [BOS] if bos else []
        if special:
            for part in split_special(text, ("<s>", "</s>")):
                ids += [BOS] if part == "<s>" else [EOS] if part == "</s>" else self._encode(part)
        else:
            ids += self._encode(text)
        if eos:
            ids.append(EOS)
        return ids

    def _encode(self, text: str) -> list[int]:
        """run.c's encode(): dummy-prefix space, one token per UTF-8 character (bytes + 3 when the
        character is not in the vocabulary), then merge the best-scoring adjacent pair (the
        leftmost on ties) until none is left. run.c rescans every pair after each merge; a heap
        keyed (-score, position) picks the same pair each time in O(n log n)."""
        if not text:
            return []
        space = self.lookup.get(b" ")
        tokens = [space] if space is not None else [ord(" ") + BYTE_OFFSET]
        for ch in text:
            piece = ch.encode("utf-8")
            token = self.lookup.get(piece)
            tokens += [token] if token is not None else [b + BYTE_OFFSET for b in piece]
        n = len(tokens)
        nxt = list(range(1, n + 1))  # n: no right neighbour
        prv = list(range(-1, n - 1))
        heap: list[tuple[float, int, int, int, int, int]] = []

        def push(i: int, j: int) -> None:
            merged = self.lookup.get(self.pieces[tokens[i]] + self.pieces[tokens[j]])
            if merged is not None:
                heapq.heappush(heap, (-self.scores[merged], i, j, tokens[i], tokens[j], merged))

        for i in range(n - 1):
            push(i, i + 1)
        while heap:
            _, i, j, left, right, merged = heapq.heappop(heap)
            if nxt[i] != j or tokens[i] != left or tokens[j] != right:
                continue  # stale: one side has merged since
            tokens[i], tokens[j] = merged, -1
            nxt[i] = nxt[j]
            if nxt[i] < n:
                prv[nxt[i]] = i
                push(i, nxt[i])
            if prv[i] >= 0:
                push(prv[i], i)
        return [t for t in tokens if t >= 0]

    def decode(self, ids: Iterable[int]) -> str:
        """Concatenated token bytes; like run.c, a piece right after BOS (or at the very start,
        as SentencePiece's decode does) loses its leading space."""
        out = bytearray()
        strip = True  # the first token, and each token right after BOS
        for token_id in map(int, ids):
            piece = self.token_bytes(token_id)
            out += piece[1:] if strip and piece.startswith(b" ") else piece
            strip = token_id == BOS
        return out.decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id] if 0 <= token_id < self.vocab_size else b""

    def token_to_id(self, piece: str) -> int | None:
        if piece in ("<s>", "</s>"):
            return BOS if piece == "<s>" else EOS
        return self.lookup.get(piece.replace("\u2581", " ").encode("utf-8"))
