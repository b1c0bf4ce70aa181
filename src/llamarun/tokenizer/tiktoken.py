"""Llama 3 `tokenizer.model`: a tiktoken BPE rank file plus Meta's special tokens.

Follows Meta's llama-models `llama3/tokenizer.py`: its pre-tokenizer pattern, 256 special tokens
at ids num_base_tokens.. (named ones first, then reserved), and its splitting of long inputs.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Iterator
from pathlib import Path

import tiktoken

from ..errors import TokenizerError

PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
NUM_RESERVED_SPECIAL_TOKENS = 256
NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message (tool call)
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
    "<|image|>",
)
# tiktoken panics on very long inputs (openai/tiktoken#195); Meta cuts them like this.
MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACE_CHARS = 25_000
# Meta's files hold 128000 ranks. A small rank file (a toy or test vocabulary) gets only the named
# special tokens, so that it fits a model of a few hundred tokens.
SMALL_RANK_FILE = 4096


def special_tokens(num_base_tokens: int) -> list[str]:
    if num_base_tokens < SMALL_RANK_FILE:
        return list(NAMED_SPECIAL_TOKENS)
    reserved = [
        f"<|reserved_special_token_{2 + i}|>"
        for i in range(NUM_RESERVED_SPECIAL_TOKENS - len(NAMED_SPECIAL_TOKENS))
    ]
    return list(NAMED_SPECIAL_TOKENS) + reserved


class TiktokenTokenizer:
    def __init__(self, path: str | Path, *, stop_ids: Iterable[int] = ()):
        self.path = Path(path)
        ranks = _load_ranks(self.path)
        n_base = len(ranks)
        self.special = {name: n_base + i for i, name in enumerate(special_tokens(n_base))}
        try:
            self.model = tiktoken.Encoding(
                name=self.path.name,
                pat_str=PATTERN,
                mergeable_ranks=ranks,
                special_tokens=self.special,
            )
        except ValueError as e:
            raise TokenizerError(
                f"{self.path} is not a usable tiktoken rank file ({e}); restore it from the original checkpoint"
            ) from e
        self.num_base_tokens = n_base
        self.vocab_size: int = n_base + len(self.special)
        self.bos_id: int | None = self.special["<|begin_of_text|>"]
        self.eos_id: int | None = self.special["<|end_of_text|>"]
        self.pad_id = -1  # Meta's Llama 3 reference pads with -1
        self.stop_ids = frozenset({self.eos_id, self.special["<|eot_id|>"]}) | frozenset(stop_ids)
        self.add_bos = True
        self.adds_dummy_prefix = False

    def encode(
        self, text: str, *, bos: bool = True, eos: bool = False, special: bool = False
    ) -> list[int]:
        ids = [self.bos_id] if bos else []
        allowed = "all" if special else set()
        for start in range(0, len(text), MAX_ENCODE_CHARS):
            for part in _split_runs(
                text[start : start + MAX_ENCODE_CHARS], MAX_NO_WHITESPACE_CHARS
            ):
                ids += self.model.encode(part, allowed_special=allowed, disallowed_special=())
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        # special tokens are control tokens: no text (as token_bytes, so streams match decode)
        return self.model.decode([i for i in map(int, ids) if 0 <= i < self.num_base_tokens])

    def token_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < self.num_base_tokens:
            return b""
        return self.model.decode_single_token_bytes(token_id)

    def token_to_id(self, piece: str) -> int | None:
        if piece in self.special:
            return self.special[piece]
        try:
            return self.model.encode_single_token(piece)
        except KeyError:
            return None


def _load_ranks(path: Path) -> dict[bytes, int]:
    """`base64 rank` lines, as tiktoken's load_tiktoken_bpe reads them (without its cache)."""
    ranks: dict[bytes, int] = {}
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise TokenizerError(f"cannot read tokenizer {path} ({e})") from e
    for n, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as e:
            raise TokenizerError(
                f"{path} line {n} is not `base64 rank` ({line[:40]!r}): the tiktoken rank file is corrupt; restore it"
            ) from e
    return ranks


def _split_runs(s: str, max_len: int) -> Iterator[str]:
    """Cut `s` so no piece holds more than `max_len` consecutive whitespace or non-whitespace chars."""
    run, is_space, start = 0, s[:1].isspace(), 0
    for i, ch in enumerate(s):
        if ch.isspace() != is_space:
            run, is_space = 1, ch.isspace()
        else:
            run += 1
            if run > max_len:
                yield s[start:i]
                start, run = i, 1
    yield s[start:]
