"""Hugging Face tokenizer.json: BOS/EOS from tokenizer_config.json or the post-processor (never a
doubled BOS), stop ids, and token bytes for byte-level and for metaspace/byte-fallback vocabularies."""

from __future__ import annotations

import json

import pytest
from tiny_tokenizers import TEXT, write_hf_tokenizer
from tokenizers import Tokenizer as HFLib
from tokenizers import decoders, models, normalizers

from llamarun.errors import TokenizerError
from llamarun.tokenizer import Tokenizer
from llamarun.tokenizer.hf import HFTokenizer
from llamarun.tokenizer.stream import StreamDecoder


@pytest.fixture
def tiny(tmp_path) -> HFTokenizer:
    return HFTokenizer(write_hf_tokenizer(tmp_path))


def test_bos_eos_and_add_bos_come_from_tokenizer_config(tiny):
    assert isinstance(tiny, Tokenizer)
    assert (tiny.vocab_size, tiny.bos_id, tiny.eos_id, tiny.pad_id) == (300, 0, 1, -1)
    assert tiny.add_bos and not tiny.adds_dummy_prefix
    assert tiny.stop_ids == {1}
    ids = tiny.encode("The cat", eos=True)
    assert ids[0] == 0 and ids[1] != 0 and ids[-1] == 1  # <s> ... </s>
    assert tiny.encode("The cat", bos=False) == ids[1:-1]


def test_bos_added_by_the_post_processor_is_never_doubled(tmp_path):
    tok = HFTokenizer(write_hf_tokenizer(tmp_path, bos_in_post_processor=True))

    assert tok.add_bos and tok.bos_id == 0
    ids = tok.encode("The cat")
    assert ids.count(0) == 1 and ids[0] == 0
    assert tok.encode("The cat", bos=False)[0] != 0


def test_bos_from_the_post_processor_without_a_config(tmp_path):
    write_hf_tokenizer(tmp_path, bos_in_post_processor=True)
    (tmp_path / "tokenizer_config.json").unlink()

    tok = HFTokenizer(tmp_path / "tokenizer.json")

    assert tok.bos_id == 0 and tok.add_bos and tok.eos_id is None


def test_no_bos_without_config_or_post_processor(tmp_path):
    write_hf_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    tok = HFTokenizer(tmp_path / "tokenizer.json")
    assert tok.bos_id is None and not tok.add_bos
    assert tok.encode("The cat") == tok.encode("The cat", bos=False)


def test_extra_stop_ids_from_the_loader(tmp_path):
    tok = HFTokenizer(write_hf_tokenizer(tmp_path), stop_ids=[1, 5])
    assert tok.stop_ids == {1, 5}


def test_special_text_is_parsed_only_when_asked(tiny):
    assert tiny.encode("<s>hi", bos=False, special=True)[0] == 0
    as_text = tiny.encode("<s>hi", bos=False)
    assert 0 not in as_text and tiny.decode(as_text) == "<s>hi"


def test_byte_level_token_bytes_undo_the_gpt2_alphabet(tiny):
    space = tiny.token_to_id("Ġ")  # GPT-2's stand-in for the byte 0x20
    assert tiny.token_bytes(space) == b" "
    assert tiny.token_bytes(tiny.token_to_id("Ã")) == b"\xc3"  # first byte of "é"
    assert tiny.token_bytes(0) == b""  # <s> is special
    ids = tiny.encode("café 😀 日本", bos=False)
    assert b"".join(map(tiny.token_bytes, ids)) == "café 😀 日本".encode()


@pytest.mark.parametrize("line", TEXT.splitlines())
def test_round_trip(tiny, line):
    assert tiny.decode(tiny.encode(line)) == line


def _metaspace_tokenizer(directory):
    """Llama-2-style tokenizer.json: '▁' for spaces, a prepended '▁', byte fallback."""
    pieces = [
        "<unk>",
        "<s>",
        "</s>",
        *[f"<0x{b:02X}>" for b in range(256)],
        "▁",
        "t",
        "h",
        "e",
        "▁t",
        "he",
        "▁the",
        "a",
    ]
    vocab = {p: i for i, p in enumerate(pieces)}
    tok = HFLib(
        models.BPE(
            vocab, [("▁", "t"), ("h", "e"), ("▁t", "he")], unk_token="<unk>", byte_fallback=True
        )
    )
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}, "add_bos_token": True})
    )
    return HFTokenizer(directory / "tokenizer.json")


def test_metaspace_and_byte_fallback_token_bytes(tmp_path):
    tok = _metaspace_tokenizer(tmp_path)

    ids = tok.encode("the hat")
    assert ids[:2] == [
        1,  # <s>
        265,  # ▁the
    ]
    assert tok.token_bytes(265) == b" the"
    assert tok.token_bytes(3 + 0xC3) == b"\xc3"  # <0xC3>, the first byte of "é"
    assert tok.adds_dummy_prefix and tok.eos_id == 2
    text = "the café"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    stream = StreamDecoder(tok, lstrip=True)
    assert "".join(stream.feed(i) for i in ids) + stream.flush() == text


def test_config_naming_an_unknown_token_is_an_error(tmp_path):
    write_hf_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>"}))
    with pytest.raises(TokenizerError, match="<bos>"):
        HFTokenizer(tmp_path / "tokenizer.json")


def test_corrupt_tokenizer_json_is_an_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "truncation": null, "model": {')
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        HFTokenizer(tmp_path / "tokenizer.json")


@pytest.mark.slow
def test_llama3_as_tokenizer_json_matches_the_tiktoken_file(tmp_path):
    from conftest import shared_model
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from llamarun.tokenizer.tiktoken import PATTERN, TiktokenTokenizer, special_tokens

    rank_file = shared_model("llama3-tokenizer/tokenizer.model")
    converted = TikTokenConverter(
        vocab_file=str(rank_file), pattern=PATTERN, extra_special_tokens=special_tokens(128000)
    ).converted()
    converted.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"})
    )
    tiktoken_tok = TiktokenTokenizer(rank_file)

    tok = HFTokenizer(tmp_path / "tokenizer.json")

    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (128256, 128000, 128001)
    assert all(
        tok.token_bytes(i) == tiktoken_tok.token_bytes(i) for i in range(tok.vocab_size)
    )  # GPT-2 alphabet undone
    for text in ["This is a test sentence.", "café 日本語 😀", " 12345\n\n  x", "<|eot_id|>"]:
        assert tok.encode(text) == tiktoken_tok.encode(text)
        assert tok.encode(text, special=True) == tiktoken_tok.encode(text, special=True)
