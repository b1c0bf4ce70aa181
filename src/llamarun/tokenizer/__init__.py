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
    stop_ids: frozenset[int]  # every id that ends generation (llama3: <|end_of_text|> and <|eot_id|>)
    add_bos: bool  # whether prompts start with BOS by default
    adds_dummy_prefix: bool  # SentencePiece-style: decode() drops the leading space of the text

    def encode(self, text: str, *, bos: bool = True, eos: bool = False, special: bool = False) -> list[int]:
        """Text -> ids. `special=True` parses special-token text such as `<|eot_id|>` into its id."""

    def decode(self, ids: Iterable[int]) -> str: ...

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (b"" for control tokens such as BOS)."""

    def token_to_id(self, piece: str) -> int | None:
        """Id of a token given its exact text (e.g. "<|im_end|>"), or None."""
