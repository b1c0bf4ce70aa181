"""llguidance's view of a llamarun tokenizer (an `LLTokenizer`), for every tokenizer kind, built
once per tokenizer and model vocabulary size and cached.

- Hugging Face `tokenizer.json`: llguidance reads the `tokenizers` JSON itself.
- Llama 3 tiktoken: from the tiktoken encoding (llguidance.tiktoken).
- SentencePiece, llama2.c, GGUF vocabularies and anything else with the Tokenizer protocol: from
  each id's bytes (llguidance's TokenizerWrapper), as llguidance's llama.cpp binding does it: a
  token without text (BOS, <|im_end|>, unused ids) is marked special with a 0xFF prefix, so a
  grammar never produces it except by name (`<|im_end|>`, `<[2]>`).
Ids past the tokenizer's vocabulary (a model's padded embedding rows) are never allowed.
The end-of-sequence ids are the tokenizer's stop ids: the matcher allows them once it accepts.
"""

from __future__ import annotations

import threading
import weakref

import llguidance
import llguidance.tiktoken

from ..tokenizer import Tokenizer
from ..tokenizer.gguf import GGUFTokenizer
from ..tokenizer.hf import HFTokenizer
from ..tokenizer.llama2c import Llama2cTokenizer
from ..tokenizer.sentencepiece import SentencePieceTokenizer
from ..tokenizer.tiktoken import TiktokenTokenizer

SPECIAL = b"\xff"  # llguidance's marker for a token that is not text

_views: weakref.WeakKeyDictionary[object, dict[int, llguidance.LLTokenizer]] = (
    weakref.WeakKeyDictionary()
)
_lock = threading.Lock()


def lltokenizer(tokenizer: Tokenizer, vocab_size: int) -> llguidance.LLTokenizer:
    """The cached llguidance view of `tokenizer` for a model with `vocab_size` logits."""
    with _lock:  # building takes 0.1-1 s; two requests at once build it once
        per_size = _views.setdefault(tokenizer, {})
        if vocab_size not in per_size:
            per_size[vocab_size] = build_lltokenizer(tokenizer, vocab_size)
        return per_size[vocab_size]


def build_lltokenizer(tokenizer: Tokenizer, vocab_size: int) -> llguidance.LLTokenizer:
    """A new view (what `lltokenizer` caches): 0.1-1 s for a 50-130k vocabulary."""
    eos = sorted(i for i in tokenizer.stop_ids if i < vocab_size)
    if isinstance(tokenizer, HFTokenizer):
        return llguidance.LLTokenizer(tokenizer.tok.to_str(), n_vocab=vocab_size, eos_token=eos)
    if isinstance(tokenizer, TiktokenTokenizer):
        return llguidance.tiktoken.lltokenizer_from_encoding(
            tokenizer.model, n_vocab=vocab_size, eos_token=eos
        )
    return llguidance.LLTokenizer(
        llguidance.TokenizerWrapper(_ByteVocabulary(tokenizer, vocab_size)), eos_token=eos
    )


class _ByteVocabulary:
    """What llguidance.TokenizerWrapper reads: each id's bytes, BOS/EOS and a tokenize function."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self.tokenizer = tokenizer
        self.tokens: list[bytes] = []
        self.special_token_ids: list[int] = []
        for i in range(vocab_size):
            piece = tokenizer.token_bytes(i) if i < tokenizer.vocab_size else b""
            if not piece:
                piece = SPECIAL + special_name(tokenizer, i).encode()
                self.special_token_ids.append(i)
            self.tokens.append(piece)
        self.bos_token_id = tokenizer.bos_id
        self.eos_token_id = tokenizer.eos_id if tokenizer.eos_id is not None else -1
        self._ids = {piece: i for i, piece in reversed(list(enumerate(self.tokens)))}
        self._longest = max(map(len, self.tokens))
        self._newline = tokenizer.encode("\n", bos=False)

    def __call__(self, text: bytes) -> list[int]:
        """Ids whose bytes are exactly `text`, as it would be tokenized mid-sequence: llguidance
        tokenizes the bytes a grammar forces with this and allows the first id, so an id with
        bytes of its own (SentencePiece's dummy-prefix space) would break the grammar."""
        tok = self.tokenizer
        s = text.decode("utf-8", errors="replace")
        if tok.adds_dummy_prefix:  # "\n" first keeps the space off the text, then is dropped
            ids = tok.encode("\n" + s, bos=False)
            ids = ids[len(self._newline) :] if ids[: len(self._newline)] == self._newline else []
        else:
            ids = tok.encode(s, bos=False)
        if b"".join(self.tokens[i] for i in ids) == text:
            return ids
        return self._greedy(text)

    def _greedy(self, text: bytes) -> list[int]:
        """Longest known piece first; bytes no piece covers are skipped."""
        ids, i = [], 0
        while i < len(text):
            for n in range(min(self._longest, len(text) - i), 0, -1):
                if text[i : i + n] in self._ids:
                    ids.append(self._ids[text[i : i + n]])
                    i += n
                    break
            else:
                i += 1
        return ids


def special_name(tokenizer: Tokenizer, token_id: int) -> str:
    """The name a grammar can use for a token without text (`<|im_end|>`), else `<[id]>`."""
    if token_id < tokenizer.vocab_size:
        if isinstance(tokenizer, GGUFTokenizer):
            return tokenizer.pieces[token_id]
        if isinstance(tokenizer, SentencePieceTokenizer):
            return tokenizer.sp.id_to_piece(token_id)
        if isinstance(tokenizer, Llama2cTokenizer):
            return tokenizer.pieces[token_id].strip().decode("utf-8", errors="replace")
    return f"<[{token_id}]>"
