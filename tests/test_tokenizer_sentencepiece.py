"""SentencePiece tokenizer: Meta's Llama 2 ids, token bytes, special-token parsing, dummy prefix."""

from __future__ import annotations

import io

import pytest
import sentencepiece as spm
from conftest import shared_model
from tiny_tokenizers import TEXT, write_sentencepiece

from llamarun.tokenizer import Tokenizer
from llamarun.tokenizer.sentencepiece import SentencePieceTokenizer


@pytest.fixture(scope="module")
def llama2() -> SentencePieceTokenizer:
    return SentencePieceTokenizer(shared_model("llama2-tokenizer/tokenizer.model"))


@pytest.fixture
def tiny(tmp_path) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(write_sentencepiece(tmp_path))


def test_llama2_literal_ids(llama2):
    assert llama2.encode("I believe the meaning of life is") == [
        1,  # <s>
        306,  # ▁I
        4658,  # ▁believe
        278,  # ▁the
        6593,  # ▁meaning
        310,  # ▁of
        2834,  # ▁life
        338,  # ▁is
    ]
    assert llama2.encode("12345", bos=False, eos=True) == [
        29871,  # ▁ (split_digits: every digit alone)
        29896,  # 1
        29906,  # 2
        29941,  # 3
        29946,  # 4
        29945,  # 5
        2,  # </s>
    ]
    assert llama2.encode("😀", bos=False) == [
        29871,  # ▁
        243,  # <0xF0> byte fallback: 3 + 0xF0
        162,  # <0x9F>
        155,  # <0x98>
        131,  # <0x80>
    ]


def test_llama2_metadata(llama2):
    assert isinstance(llama2, Tokenizer)
    assert (llama2.vocab_size, llama2.bos_id, llama2.eos_id, llama2.pad_id) == (32000, 1, 2, -1)
    assert llama2.stop_ids == {2}
    assert llama2.add_bos and llama2.adds_dummy_prefix


def test_llama2_token_bytes(llama2):
    assert llama2.token_bytes(15043) == b" Hello"  # ▁Hello
    assert llama2.token_bytes(243) == b"\xf0"  # <0xF0>
    assert llama2.token_bytes(13) == b"\n"  # <0x0A>
    assert llama2.token_bytes(1) == b"" and llama2.token_bytes(2) == b""  # control tokens
    assert llama2.token_bytes(40000) == b""  # past the vocabulary (a padded embedding row)


def test_llama2_special_text_is_parsed_only_when_asked(llama2):
    text = "<s>[INST] hi [/INST]</s>"
    assert llama2.encode(text, bos=False, special=True) == [
        1,  # <s>
        518,  # ▁[
        25580,  # INST
        29962,  # ]
        7251,  # ▁hi
        518,  # ▁[
        29914,  # /
        25580,  # INST
        29962,  # ]
        2,  # </s>
    ]
    assert llama2.encode(text, bos=False)[:3] == [
        529,  # ▁<
        29879,  # s
        24566,  # >[
    ]


@pytest.mark.parametrize(
    "text", ["Hello world", "  two  spaces", "café naïve", "日本語 😀", "tab\tand\nnewline", ""]
)
def test_llama2_round_trip(llama2, text):
    assert llama2.decode(llama2.encode(text)) == text


def test_llama2_token_to_id(llama2):
    assert llama2.token_to_id("▁Hello") == 15043
    assert llama2.token_to_id("</s>") == 2
    assert llama2.token_to_id("<unk>") == 0
    assert llama2.token_to_id("no such piece") is None


def test_tiny_model_uses_byte_fallback(tiny):
    assert tiny.vocab_size == 300
    ids = tiny.encode("Hi 😀", bos=False)
    byte_pieces = [tiny.token_bytes(i) for i in ids if 3 <= i < 259]
    assert byte_pieces == [
        b"H",
        b"\xf0",
        b"\x9f",
        b"\x98",
        b"\x80",
    ]  # "H" and "😀" are not in the tiny vocabulary
    assert tiny.decode(ids) == "Hi 😀"
    for line in TEXT.splitlines():
        assert tiny.decode(tiny.encode(line)) == line


def test_dummy_prefix_comes_from_the_model_file(tmp_path):
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT.splitlines() * 20), model_writer=out, model_type="bpe", vocab_size=300,
        byte_fallback=True, add_dummy_prefix=False, remove_extra_whitespaces=False, num_threads=1, minloglevel=2,
    )  # fmt: skip
    path = tmp_path / "m.model"
    path.write_bytes(out.getvalue())

    tok = SentencePieceTokenizer(path)

    assert not tok.adds_dummy_prefix
    assert tok.decode(tok.encode(" leading space")) == " leading space"
