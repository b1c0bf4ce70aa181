"""Hugging Face `tokenizer.json` via the `tokenizers` library, with BOS/EOS from the
`tokenizer_config.json` beside it (or, failing that, from the template post-processor).

We always encode with add_special_tokens=False and add BOS ourselves, so a post-processor that
inserts BOS never doubles it.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from ..errors import TokenizerError

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: printable bytes stand for themselves, the other 68
    bytes are mapped to code points 256.. (openai/gpt-2 encoder.py bytes_to_unicode)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class HFTokenizer:
    def __init__(self, path: str | Path, *, stop_ids: Iterable[int] = ()):
        self.path = Path(path)
        try:
            raw = self.path.read_text(encoding="utf-8")
            spec = json.loads(raw)
            self.tok = _HFTokenizer.from_str(raw)
        except Exception as e:  # tokenizers raises plain Exception on a bad file
            raise TokenizerError(
                f"{self.path} is not a readable Hugging Face tokenizer.json ({e}); restore it from the original checkpoint"
            ) from e
        config = _read_config(self.path.parent / "tokenizer_config.json")
        self.vocab_size: int = max(self.tok.get_vocab(with_added_tokens=True).values()) + 1
        added = self.tok.get_added_tokens_decoder()
        self._special = {i for i, t in added.items() if t.special}
        self._added_text = {i: t.content for i, t in added.items() if not t.special}
        self._byte_level = _mentions(spec.get("decoder"), "ByteLevel") or _mentions(
            spec.get("pre_tokenizer"), "ByteLevel"
        )
        self._bytes: dict[int, bytes] = {}
        self._lock = threading.Lock()

        post_bos, post_eos = self._post_processor_specials()
        self.bos_id: int | None = self._config_id(config, "bos_token", post_bos)
        self.eos_id: int | None = self._config_id(config, "eos_token", post_eos)
        self.pad_id: int = self._config_id(config, "pad_token", None)
        self.pad_id = -1 if self.pad_id is None else self.pad_id
        add_bos = config.get("add_bos_token")
        self.add_bos = self.bos_id is not None and (
            add_bos if isinstance(add_bos, bool) else post_bos is not None
        )
        self.stop_ids = frozenset({self.eos_id} - {None}) | frozenset(stop_ids)
        probe = self.encode("a", bos=False)
        self.adds_dummy_prefix = b"".join(map(self.token_bytes, probe)).startswith(
            b" "
        ) and not self.decode(probe).startswith(" ")

    def _post_processor_specials(self) -> tuple[int | None, int | None]:
        """Ids the template post-processor puts before and after a text (Llama 3: BOS first)."""
        plain = self.tok.encode("a", add_special_tokens=False).ids
        full = self.tok.encode("a", add_special_tokens=True).ids
        if len(full) <= len(plain):
            return None, None
        start = next(
            (i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain),
            None,
        )
        if start is None:
            return None, None
        before, after = full[:start], full[start + len(plain) :]
        return (before[0] if before else None), (after[-1] if after else None)

    def _config_id(self, config: dict, key: str, default: int | None) -> int | None:
        value = config.get(key)
        if isinstance(value, dict):  # a serialised AddedToken
            value = value.get("content")
        if isinstance(value, str):
            token_id = self.tok.token_to_id(value)
            if token_id is None:
                raise TokenizerError(
                    f"{self.path.parent / 'tokenizer_config.json'} names {key} {value!r}, which is not in {self.path}; fix the config or the tokenizer"
                )
            return token_id
        return default

    def encode(
        self, text: str, *, bos: bool = True, eos: bool = False, special: bool = False
    ) -> list[int]:
        with self._lock:  # encode_special_tokens is state on the shared tokenizer
            self.tok.encode_special_tokens = not special  # True: "<|eot_id|>" in text stays text
            ids = self.tok.encode(text, add_special_tokens=False).ids
        if bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(
            [i for i in map(int, ids) if 0 <= i < self.vocab_size], skip_special_tokens=True
        )

    def token_bytes(self, token_id: int) -> bytes:
        cached = self._bytes.get(token_id)
        if cached is None:
            cached = self._bytes[token_id] = self._token_bytes(token_id)
        return cached

    def _token_bytes(self, token_id: int) -> bytes:
        if token_id in self._special:
            return b""
        if token_id in self._added_text:
            return self._added_text[token_id].encode()
        piece = self.tok.id_to_token(token_id)
        if piece is None:
            return b""
        if self._byte_level:
            table = gpt2_byte_decoder()
            return b"".join(bytes([table[c]]) if c in table else c.encode() for c in piece)
        m = _BYTE_PIECE.fullmatch(piece)  # SentencePiece-style byte fallback
        if m:
            return bytes([int(m.group(1), 16)])
        return piece.replace("\u2581", " ").encode()

    def token_to_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)


def _read_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path} is not valid JSON ({e}); fix it or remove it") from e
    return data if isinstance(data, dict) else {}


def _mentions(node: object, type_name: str) -> bool:
    """Whether a normalizer/decoder/pre-tokenizer spec (possibly a Sequence) has `type_name`."""
    if isinstance(node, dict):
        return node.get("type") == type_name or any(_mentions(v, type_name) for v in node.values())
    if isinstance(node, list):
        return any(_mentions(v, type_name) for v in node)
    return False
