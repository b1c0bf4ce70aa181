"""StreamDecoder: token ids in, complete UTF-8 text out, one piece per token."""

from __future__ import annotations

import codecs

from .base import Tokenizer


class StreamDecoder:
    """Feeds token bytes through an incremental UTF-8 decoder, so a character split across tokens
    (emoji, CJK, SentencePiece byte fallback) is emitted once it is complete.

    lstrip: drop the leading space the way the tokenizer's decode() does at the start of a text
    (SentencePiece dummy prefix); leave False when continuing a prompt, so " Paris" keeps its space.
    """

    def __init__(self, tokenizer: Tokenizer, *, lstrip: bool = False):
        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip = lstrip and getattr(tokenizer, "adds_dummy_prefix", False)

    def feed(self, token_id: int) -> str:
        text = self._decoder.decode(self.tokenizer.token_bytes(token_id))
        if self._strip and text:
            self._strip = False
            text = text[1:] if text.startswith(" ") else text
        return text

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)
