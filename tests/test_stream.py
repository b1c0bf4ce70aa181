"""StreamDecoder: pieces fed one token at a time join to decode(ids), with characters split
across byte-fallback tokens (emoji, CJK) emitted whole once complete."""

from __future__ import annotations

import pytest
from conftest import shared_model
from tiny_tokenizers import (
    write_hf_tokenizer,
    write_llama2c_tokenizer,
    write_sentencepiece,
    write_tiktoken,
)

from llamarun.tokenizer import load_tokenizer
from llamarun.tokenizer.stream import StreamDecoder

TEXTS = [
    "Once upon a time, café 😀 日本語!",
    "  leading spaces and 🦙🦙",
    "line one\nline two\t3.14",
]


def _tiny(kind, tmp_path):
    if kind == "sentencepiece":
        return write_sentencepiece(tmp_path)
    if kind == "llama2c":
        return write_llama2c_tokenizer(write_sentencepiece(tmp_path), tmp_path / "tok.bin")
    if kind == "tiktoken":
        return write_tiktoken(tmp_path)
    return write_hf_tokenizer(tmp_path)


def _stream(tok, ids, lstrip=True):
    decoder = StreamDecoder(tok, lstrip=lstrip)
    pieces = [decoder.feed(i) for i in ids]
    return pieces, "".join(pieces) + decoder.flush()


@pytest.mark.parametrize("kind", ["sentencepiece", "llama2c", "tiktoken", "hf"])
@pytest.mark.parametrize("text", TEXTS)
def test_joined_pieces_equal_decode_for_tiny_tokenizers(tmp_path, kind, text):
    tok = load_tokenizer(_tiny(kind, tmp_path))
    ids = tok.encode(text)

    pieces, joined = _stream(tok, ids)

    assert joined == tok.decode(ids)
    assert "\ufffd" not in joined


@pytest.mark.parametrize(
    "path",
    [
        "llama2-tokenizer/tokenizer.model",
        "llama2-tokenizer/tokenizer.bin",
        "llama3-tokenizer/tokenizer.model",
    ],
)
@pytest.mark.parametrize("text", TEXTS)
def test_joined_pieces_equal_decode_for_real_tokenizers(path, text):
    tok = load_tokenizer(shared_model(path))
    ids = tok.encode(text)
    assert _stream(tok, ids)[1] == tok.decode(ids)


def test_emoji_split_across_byte_tokens_comes_out_whole():
    tok = load_tokenizer(shared_model("llama2-tokenizer/tokenizer.model"))
    ids = tok.encode("a😀", bos=False)
    assert ids[-4:] == [243, 162, 155, 131]  # <0xF0> <0x9F> <0x98> <0x80>

    pieces, joined = _stream(tok, ids)

    assert pieces[-4:] == ["", "", "", "😀"]
    assert joined == "a😀"


def test_cjk_split_across_byte_tokens_comes_out_whole(tmp_path):
    tok = load_tokenizer(write_sentencepiece(tmp_path))  # the tiny vocabulary has no CJK pieces
    ids = tok.encode("語", bos=False)
    assert len(ids) == 4  # "▁" + three byte tokens

    pieces, joined = _stream(tok, ids)

    assert pieces == ["", "", "", "語"]  # the dummy-prefix space is dropped, then one character
    assert joined == "語"


def test_continuation_keeps_its_leading_space():
    tok = load_tokenizer(shared_model("llama2-tokenizer/tokenizer.model"))
    ids = tok.encode("Paris", bos=False)  # "▁Paris"
    assert _stream(tok, ids, lstrip=False)[1] == " Paris"
    assert _stream(tok, ids, lstrip=True)[1] == "Paris"


def test_incomplete_character_is_replaced_at_flush():
    tok = load_tokenizer(shared_model("llama2-tokenizer/tokenizer.model"))
    decoder = StreamDecoder(tok)
    assert decoder.feed(243) == ""  # <0xF0>: the start of a 4-byte character
    assert decoder.flush() == "\ufffd"
