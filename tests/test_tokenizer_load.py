"""load_tokenizer / find_tokenizer: the kind comes from file contents, never names; a folder gives
its best tokenizer (fitting the model's vocabulary, then tokenizer.json > SentencePiece >
tiktoken > llama2.c); weights files are skipped unread."""

from __future__ import annotations

import random
import shutil
import struct
import time

import pytest
from conftest import shared_model
from tiny_tokenizers import (
    write_hf_tokenizer,
    write_llama2c_tokenizer,
    write_sentencepiece,
    write_tiktoken,
)

from llamarun.errors import TokenizerError
from llamarun.sniff import sniff_tokenizer
from llamarun.tokenizer import find_tokenizer, load_tokenizer


@pytest.fixture
def all_kinds(tmp_path):
    """One file of each kind under a misleading name, in one folder."""
    for sub in ("sp", "tt", "hf"):
        (tmp_path / sub).mkdir()
    sp = write_sentencepiece(tmp_path / "sp")
    write_llama2c_tokenizer(sp, tmp_path / "mixed_llama2c.json")
    shutil.copy(sp, tmp_path / "mixed_sp.bin")
    shutil.copy(write_tiktoken(tmp_path / "tt"), tmp_path / "mixed_tt.json")
    shutil.copy(write_hf_tokenizer(tmp_path / "hf"), tmp_path / "mixed_hf.model")
    return tmp_path


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("mixed_llama2c.json", "Llama2cTokenizer"),
        ("mixed_sp.bin", "SentencePieceTokenizer"),
        ("mixed_tt.json", "TiktokenTokenizer"),
        ("mixed_hf.model", "HFTokenizer"),
    ],
)
def test_kind_comes_from_contents_not_the_name(all_kinds, name, cls):
    assert type(load_tokenizer(all_kinds / name)).__name__ == cls


def test_folder_prefers_tokenizer_json_then_sentencepiece_then_tiktoken_then_llama2c(all_kinds):
    names = ["mixed_hf.model", "mixed_sp.bin", "mixed_tt.json", "mixed_llama2c.json"]
    expected = ["HFTokenizer", "SentencePieceTokenizer", "TiktokenTokenizer", "Llama2cTokenizer"]
    for name, cls in zip(names, expected):
        for sub in ("sp", "tt", "hf"):
            shutil.rmtree(all_kinds / sub, ignore_errors=True)
        assert type(load_tokenizer(all_kinds)).__name__ == cls
        (all_kinds / name).unlink()
    assert find_tokenizer(all_kinds) is None


def test_folder_prefers_the_tokenizer_that_fits_the_vocabulary(all_kinds):
    for sub in ("sp", "tt", "hf"):
        shutil.rmtree(all_kinds / sub)
    # tiny sizes: tokenizer.json 300, SentencePiece 300, tiktoken 308, llama2.c 300
    assert type(find_tokenizer(all_kinds, 308)).__name__ == "TiktokenTokenizer"
    assert type(find_tokenizer(all_kinds, 300)).__name__ == "HFTokenizer"
    assert type(find_tokenizer(all_kinds, 320)).__name__ == "HFTokenizer"  # smaller fits too


def test_stop_ids_are_passed_through(tmp_path):
    tok = load_tokenizer(write_sentencepiece(tmp_path), stop_ids=[7])
    assert tok.stop_ids == {2, 7}


def test_stories260k_folder_finds_its_tokenizer_beside_the_model():
    folder = shared_model("stories260K")
    tok = find_tokenizer(folder, 512)
    assert tok is not None and tok.vocab_size == 512
    assert sniff_tokenizer(folder / "stories260K.bin") is None  # the model itself is skipped


def test_real_tokenizer_files_are_recognised():
    assert sniff_tokenizer(shared_model("llama2-tokenizer/tokenizer.model")) == "sentencepiece"
    assert sniff_tokenizer(shared_model("llama2-tokenizer/tokenizer.bin")) == "llama2c"
    assert sniff_tokenizer(shared_model("llama3-tokenizer/tokenizer.model")) == "tiktoken"


def test_weights_files_are_skipped_quickly(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF" + bytes(100))
    (tmp_path / "consolidated.00.pth").write_bytes(b"PK\x03\x04" + bytes(100))
    (tmp_path / "config.json").write_text('{"hidden_size": 64, "num_hidden_layers": 2}')
    with open(tmp_path / "huge.bin", "wb") as f:  # sparse: 1 GiB that reads as zeros
        f.truncate(1 << 30)
    (tmp_path / "random.dat").write_bytes(random.Random(0).randbytes(100_000))
    t0 = time.perf_counter()

    assert find_tokenizer(tmp_path) is None

    assert time.perf_counter() - t0 < 1.0


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "nope.model")


def test_folder_without_tokenizer_lists_what_was_looked_for(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(
        TokenizerError, match="tokenizer.json.*SentencePiece.*tiktoken.*tokenizer.bin"
    ):
        load_tokenizer(tmp_path)


def test_unrecognised_file_is_an_error(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(struct.pack("<4i", 99999, 1, 2, 3))
    with pytest.raises(TokenizerError, match="not a tokenizer llamarun can read"):
        load_tokenizer(path)


def test_corrupt_rank_file_is_an_error(tmp_path):
    path = write_tiktoken(tmp_path)
    path.write_text(path.read_text() + "!!notbase64 9999\n")
    with pytest.raises(TokenizerError):
        load_tokenizer(path)


def test_stop_ids_may_be_a_single_id_or_a_generator(tmp_path):
    write_sentencepiece(tmp_path)
    assert load_tokenizer(tmp_path, stop_ids=9).stop_ids == {2, 9}
    assert find_tokenizer(tmp_path, stop_ids=(i for i in [5, 6])).stop_ids == {2, 5, 6}
