"""Llama 3 tiktoken tokenizer: Meta's known ids, special tokens and both stop ids, long inputs."""

from __future__ import annotations

import pytest
from conftest import shared_model
from tiny_tokenizers import TEXT, write_tiktoken

from llamarun.tokenizer import Tokenizer
from llamarun.tokenizer.tiktoken import NAMED_SPECIAL_TOKENS, TiktokenTokenizer


@pytest.fixture(scope="module")
def llama3() -> TiktokenTokenizer:
    return TiktokenTokenizer(shared_model("llama3-tokenizer/tokenizer.model"))


@pytest.fixture
def tiny(tmp_path) -> TiktokenTokenizer:
    return TiktokenTokenizer(write_tiktoken(tmp_path))


def test_llama3_known_ids(llama3):
    # /work/shared/models/README.md and Meta's llama3 test_tokenizer.py
    assert llama3.encode("This is a test sentence.") == [
        128000,  # <|begin_of_text|>
        2028,  # This
        374,  # ' is'
        264,  # ' a'
        1296,  # ' test'
        11914,  # ' sentence'
        13,  # .
    ]
    assert llama3.encode(" 12345", bos=False) == [
        220,  # ' '
        4513,  # 123 (digits in groups of up to three)
        1774,  # 45
    ]


def test_llama3_special_tokens_and_stop_ids(llama3):
    assert isinstance(llama3, Tokenizer)
    assert llama3.vocab_size == 128256
    assert (llama3.bos_id, llama3.eos_id, llama3.pad_id) == (128000, 128001, -1)
    assert llama3.stop_ids == {128001, 128009}  # <|end_of_text|>, <|eot_id|>
    assert llama3.token_to_id("<|start_header_id|>") == 128006
    assert llama3.token_to_id("<|end_header_id|>") == 128007
    assert llama3.token_to_id("<|eom_id|>") == 128008
    assert llama3.token_to_id("<|eot_id|>") == 128009
    assert llama3.token_to_id("<|python_tag|>") == 128010
    assert llama3.token_to_id("<|reserved_special_token_245|>") == 128255  # the last one
    assert llama3.add_bos and not llama3.adds_dummy_prefix


def test_llama3_special_text_is_parsed_only_when_asked(llama3):
    text = "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
    assert llama3.encode(text, bos=False, special=True) == [
        128006,  # <|start_header_id|>
        882,  # user
        128007,  # <|end_header_id|>
        271,  # \n\n
        6151,  # hi
        128009,  # <|eot_id|>
    ]
    as_text = llama3.encode("<|eot_id|>", bos=False)
    assert 128009 not in as_text and llama3.decode(as_text) == "<|eot_id|>"


def test_llama3_token_bytes_and_decode_skip_special_tokens(llama3):
    assert llama3.token_bytes(2028) == b"This"
    assert llama3.token_bytes(128000) == b"" and llama3.token_bytes(128009) == b""
    assert llama3.decode([128000, 2028, 374, 128009]) == "This is"


@pytest.mark.parametrize(
    "text", ["café 日本語 😀", "a" * 60_000, " " * 30_000 + "x", "line\r\n\tend "]
)
def test_llama3_round_trip_including_long_runs(llama3, text):
    # runs longer than 25,000 characters are cut first, as Meta does (tiktoken issue 195)
    assert llama3.decode(llama3.encode(text)) == text


def test_tiny_rank_file_puts_special_tokens_after_its_ranks(tiny):
    assert tiny.num_base_tokens == 296  # 256 bytes + 40 merges
    assert tiny.vocab_size == 296 + len(NAMED_SPECIAL_TOKENS) <= 320
    assert tiny.bos_id == 296 and tiny.eos_id == 297
    assert tiny.stop_ids == {297, 296 + NAMED_SPECIAL_TOKENS.index("<|eot_id|>")}
    assert tiny.encode("<|eot_id|>", bos=False, special=True) == [296 + 9]


def test_tiny_round_trip_and_merges(tiny):
    ids = tiny.encode("the cat", bos=False)
    assert len(ids) < len("the cat")  # merges learnt from the text apply
    assert b"".join(tiny.token_bytes(i) for i in ids) == b"the cat"
    for line in TEXT.splitlines():
        assert tiny.decode(tiny.encode(line)) == line
