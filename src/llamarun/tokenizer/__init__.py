"""Tokenizers: one protocol, one implementation per file kind, chosen by file contents.

Kinds: SentencePiece `tokenizer.model`, Llama 3 tiktoken rank file, Hugging Face `tokenizer.json`,
llama2.c `tokenizer.bin` (sniffed in sniff.py), and GGUF metadata (tokenizer/gguf.py, built by
the GGUF loader).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ..errors import TokenizerError
from ..sniff import sniff_tokenizer, tokenizer_files
from .base import Tokenizer, split_special
from .hf import HFTokenizer
from .llama2c import Llama2cTokenizer
from .sentencepiece import SentencePieceTokenizer
from .tiktoken import TiktokenTokenizer

__all__ = ["Tokenizer", "find_tokenizer", "load_tokenizer", "split_special"]

KINDS = {
    "hf": HFTokenizer,
    "sentencepiece": SentencePieceTokenizer,
    "tiktoken": TiktokenTokenizer,
    "llama2c": Llama2cTokenizer,
}


def load_tokenizer(path: str | Path, *, stop_ids: Iterable[int] = ()) -> Tokenizer:
    """Load the tokenizer file at `path`, recognised by its contents (a folder: the best one in it).

    stop_ids: extra ids that end generation (e.g. config.json's `eos_token_id`).
    """
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


def _build(kind: str, path: Path, stop_ids: Iterable[int] | int) -> Tokenizer:
    return KINDS[kind](path, stop_ids=_as_ids(stop_ids))


def _as_ids(ids: Iterable[int] | int) -> tuple[int, ...]:
    return (ids,) if isinstance(ids, int) else tuple(ids)  # config.json's eos_token_id: int or list
