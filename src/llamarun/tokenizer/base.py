"""The protocol every tokenizer kind satisfies, and the helper they share."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

# Tokens chat templates write at the end of a turn: generation stops on them even when they are
# not the model's EOS (Llama 3's <|eot_id|>, ChatML's <|im_end|>, Phi-3's <|end|>, Gemma's).
END_OF_TURN = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>")
# End-of-text tokens some vocabularies mark only as CONTROL, not as their EOS id.
END_OF_TEXT = ("<|end_of_text|>", "<|endoftext|>")


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


def split_special(text: str, specials: Iterable[str]) -> list[str]:
    """`text` cut around every occurrence of the given special-token strings (longest first);
    the specials themselves are list items of their own."""
    names = sorted(set(specials), key=len, reverse=True)
    if not names:
        return [text]
    pattern = "(" + "|".join(re.escape(n) for n in names) + ")"
    return [part for part in re.split(pattern, text) if part]
