"""Constrained decoding: a `Guide` (guide.py) says what a row may generate; a backend compiles it,
once per request and tokenizer, into a `Matcher` that gives each step's allowed tokens as a
bitmask and follows the sampled ones; masks.py applies the masks to a batch's logits.

The backend is a pair of functions, so another library (xgrammar's GrammarCompiler and
GrammarMatcher have the same shape) is one more `Backend`. Today: llguidance (llg.py)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from ..tokenizer import Tokenizer
from . import llg
from .guide import ANY_OBJECT, Guide, make_guide

__all__ = ["ANY_OBJECT", "Backend", "Constraints", "Guide", "Matcher", "make_guide", "check"]


class Matcher(Protocol):
    """One row's grammar state."""

    def fill_mask(self, row: torch.Tensor) -> None:
        """Allowed next tokens into a (W,) int32 CPU row: bit i % 32 of word i // 32 for token i."""

    def consume(self, token_id: int) -> bool:
        """Advance past a sampled token; False (and an error state) if it was not allowed."""

    def is_accepting(self) -> bool:
        """The text so far is complete: the row may end here."""

    def is_stopped(self) -> bool:
        """Nothing may follow: the row ends here."""

    def error(self) -> str | None: ...

    def fork(self) -> Matcher:
        """An independent copy in the same state (n > 1 choices, each row its own)."""


@dataclass(frozen=True)
class Backend:
    name: str
    check: Callable[[Guide], object]  # RequestError naming the parameter when the guide is bad
    compile: Callable[[Guide, Tokenizer, int], Matcher]  # a matcher in its start state


LLGUIDANCE = Backend("llguidance", llg.grammar_of, llg.compile_guide)


def check(guide: Guide, backend: Backend = LLGUIDANCE) -> None:
    """RequestError naming the parameter if the backend cannot use `guide` (no tokenizer needed)."""
    backend.check(guide)


class Constraints:
    """Compiled guides for one tokenizer and model vocabulary: each is compiled once (the last
    CACHED kept) and every row gets a fork of it."""

    CACHED = 64

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, backend: Backend = LLGUIDANCE):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.backend = backend
        self._compiled: OrderedDict[Guide, Matcher] = OrderedDict()
        # the server compiles on request threads and forks on the engine's
        self._lock = threading.Lock()

    def compile(self, guide: Guide) -> Matcher:
        """The start state of `guide`, compiled now if it is not cached (RequestError if bad)."""
        with self._lock:
            if guide in self._compiled:
                self._compiled.move_to_end(guide)
                return self._compiled[guide]
        matcher = self.backend.compile(guide, self.tokenizer, self.vocab_size)
        with self._lock:
            self._compiled[guide] = matcher
            while len(self._compiled) > self.CACHED:
                self._compiled.popitem(last=False)
        return matcher

    def matcher(self, guide: Guide) -> Matcher:
        """A fresh matcher for one row."""
        return self.compile(guide).fork()
