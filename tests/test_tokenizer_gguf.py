"""Tokenizers from GGUF metadata: the `llama` kind encodes like SentencePiece, the `gpt2` kind like
transformers' GPT-2 style tokenizers, both from vocabularies embedded in real and tiny files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")

from conftest import shared_model  # noqa: E402
from tiny_tokenizers import write_hf_tokenizer  # noqa: E402

from llamarun.errors import TokenizerError  # noqa: E402
from llamarun.loaders.gguf_file import GGUFFile  # noqa: E402
from llamarun.tokenizer import Tokenizer  # noqa: E402
from llamarun.tokenizer.gguf import CONTROL, NORMAL, USER_DEFINED, GGUFTokenizer  # noqa: E402

STRINGS = [
    "Hello world",
    "  two leading spaces",
    "multiple   spaces  inside ",
    "digits 1234567 and 3.14159",
    "accents: café, naïve, Ünïcödé, señor",
    "emoji 😀🎉 and a family 👩‍👩‍👧",
    "CJK 你好世界 日本語",
    "tabs\tand\nnew\n\nlines",
    " ",
    "don't I'll WE'RE they've",
]
SMOLLM2 = "smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_RANDOM = "llama-2-tiny-random/llama-2-tiny-random.gguf"


def gguf_tokenizer(path: Path) -> GGUFTokenizer:
    return GGUFTokenizer.from_metadata(GGUFFile(path).meta, path)


@pytest.fixture(scope="module")
def llama2_gguf() -> GGUFTokenizer:
    return gguf_tokenizer(shared_model(TINY_RANDOM))


@pytest.fixture(scope="module")
def smollm2() -> GGUFTokenizer:
    return gguf_tokenizer(shared_model(SMOLLM2))


def test_llama_vocab_encodes_like_sentencepiece(llama2_gguf):
    import sentencepiece

    reference = sentencepiece.SentencePieceProcessor(
        model_file=str(shared_model("llama2-tokenizer/tokenizer.model"))
    )

    for text in STRINGS + ["", "<s> and </s> stay text", "x\u2581y"]:
        ids = llama2_gguf.encode(text, bos=False)
        assert ids == reference.encode(text), text
        assert llama2_gguf.decode(ids) == reference.decode(ids), text


def test_llama_vocab_literal_ids_and_specials(llama2_gguf):
    ids = llama2_gguf.encode("Hello", special=True)

    assert ids == [1, 15043]  # <s>, "▁Hello"
    assert llama2_gguf.encode("<s>hi</s>", bos=False, special=True) == [
        1,
        7251,
        2,
    ]  # <s> "▁hi" </s>: text after a special keeps the dummy prefix
    assert llama2_gguf.encode("<s>", bos=False) == [
        529,
        29879,
        29958,
    ]  # "▁<" "s" ">": text unless special
    assert (llama2_gguf.bos_id, llama2_gguf.eos_id, llama2_gguf.pad_id) == (1, 2, -1)
    assert llama2_gguf.stop_ids == {2} and llama2_gguf.add_bos and llama2_gguf.adds_dummy_prefix
    assert isinstance(llama2_gguf, Tokenizer)


def test_llama_vocab_token_bytes(llama2_gguf):
    assert llama2_gguf.token_bytes(1) == b""  # <s> is a control token
    assert llama2_gguf.token_bytes(3 + 0xE4) == b"\xe4"  # <0xE4> byte-fallback piece
    assert llama2_gguf.token_bytes(15043) == b" Hello"  # ▁ is a space
    assert llama2_gguf.token_to_id("▁Hello") == 15043


@pytest.mark.slow  # transformers reads the whole 100 MB file (~15 s here)
def test_gpt2_vocab_encodes_like_transformers_gguf_reader(smollm2):
    transformers = pytest.importorskip("transformers")
    path = shared_model(SMOLLM2)
    reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)

    texts = STRINGS + [
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
        "a<|endoftext|>b",
    ]
    for text in texts:
        assert smollm2.encode(text, bos=False, special=True) == reference.encode(
            text, add_special_tokens=False
        ), text


def test_gpt2_vocab_literal_ids_specials_and_stops(smollm2):
    assert smollm2.encode("Hello world", bos=False) == [19556, 905]  # "Hello", "Ġworld"
    assert smollm2.encode("2024", bos=False) == [
        34,
        32,
        34,
        36,
    ]  # digits one by one (smollm pre-tokenizer)
    assert smollm2.encode("<|im_end|>", bos=False, special=True) == [2]
    assert 2 not in smollm2.encode("<|im_end|>", bos=False)  # plain text unless special=True
    assert smollm2.stop_ids == {0, 2}  # <|endoftext|>, <|im_end|> (the file's eos)
    assert not smollm2.add_bos and not smollm2.adds_dummy_prefix
    assert smollm2.pad_id == 2 and smollm2.token_to_id("<|im_start|>") == 1


def test_gpt2_token_bytes_undo_the_byte_alphabet(smollm2):
    text = "café 😀 naïve"
    ids = smollm2.encode(text, bos=False)

    assert b"".join(smollm2.token_bytes(i) for i in ids) == text.encode()
    assert smollm2.decode(ids) == text
    assert smollm2.token_bytes(2) == b""


def tiny_gpt2_metadata(tmp_path: Path, pre: str) -> dict:
    """GGUF tokenizer metadata from a tiny byte-level BPE trained by `tokenizers`, plus ChatML specials."""
    spec = json.loads(write_hf_tokenizer(tmp_path).read_text())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get) + ["<|im_start|>", "<|im_end|>"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    types = [
        CONTROL if t in ("<s>", "</s>", "<|im_start|>", "<|im_end|>") else NORMAL for t in tokens
    ]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.add_bos_token": True,
    }


def test_tiny_gpt2_vocab_matches_transformers_fast_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    meta = tiny_gpt2_metadata(tmp_path, "default")
    reference = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tmp_path / "tokenizer.json")
    )
    reference.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})

    tok = GGUFTokenizer.from_metadata(meta, tmp_path / "t.gguf")

    for text in STRINGS + ["<|im_start|>user\nhi<|im_end|>"]:
        assert tok.encode(text, bos=False, special=True) == reference.encode(
            text, add_special_tokens=False
        ), text
    assert tok.encode("Lily", bos=True)[0] == 0 and tok.add_bos
    assert tok.stop_ids == {1, tok.token_to_id("<|im_end|>")}


def test_unknown_pre_tokenizer_and_model_are_named(tmp_path):
    meta = tiny_gpt2_metadata(tmp_path, "qwen2")

    with pytest.raises(
        TokenizerError,
        match=r"pre-tokenizer 'qwen2' \(tokenizer\.ggml\.pre\); llamarun knows default",
    ):
        GGUFTokenizer.from_metadata(meta, tmp_path / "t.gguf")
    with pytest.raises(TokenizerError, match=r"tokenizer of kind 'rwkv'"):
        GGUFTokenizer.from_metadata(meta | {"tokenizer.ggml.model": "rwkv"}, tmp_path / "t.gguf")


def llama3_gguf_metadata(rank_path: Path) -> tuple[dict, dict[bytes, int]]:
    """GGUF metadata for Meta's Llama 3 tokenizer the way llama.cpp stores it: tokens in the GPT-2
    byte alphabet, merges = every split of a token into two tokens (as transformers' tiktoken
    converter derives them), 256 special tokens as CONTROL."""
    import base64

    from llamarun.tokenizer.gguf import _bytes_to_unicode
    from llamarun.tokenizer.tiktoken import special_tokens

    ranks = {}
    for line in rank_path.read_bytes().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    alphabet = _bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(alphabet[x] for x in b)

    ordered = sorted(ranks, key=ranks.get)
    merges = []
    for token in ordered:
        splits = [
            (ranks[token[:i]], ranks[token[i:]], i)
            for i in range(1, len(token))
            if token[:i] in ranks and token[i:] in ranks
        ]
        merges += [f"{text(token[:i])} {text(token[i:])}" for _, _, i in sorted(splits)]
    specials = special_tokens(len(ranks))
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.tokens": [text(t) for t in ordered] + specials,
        "tokenizer.ggml.token_type": [NORMAL] * len(ranks) + [CONTROL] * len(specials),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 128000,
        "tokenizer.ggml.eos_token_id": 128009,
        "tokenizer.ggml.add_bos_token": True,
    }
    return meta, ranks


def test_llama_bpe_vocab_encodes_like_tiktoken():
    import tiktoken

    from llamarun.tokenizer.tiktoken import PATTERN, special_tokens

    meta, ranks = llama3_gguf_metadata(shared_model("llama3-tokenizer/tokenizer.model"))
    specials = {t: len(ranks) + i for i, t in enumerate(special_tokens(len(ranks)))}
    reference = tiktoken.Encoding(
        "llama3", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=specials
    )

    tok = GGUFTokenizer.from_metadata(meta, Path("llama3.gguf"))

    texts = STRINGS + [
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
        "a" * 40,
        "   \n\n  x",
    ]
    for text in texts:
        assert tok.encode(text, bos=False, special=True) == reference.encode(
            text, allowed_special="all"
        ), text
    assert tok.encode("This is a test sentence.") == [128000, 2028, 374, 264, 1296, 11914, 13]
    assert tok.stop_ids == {128001, 128008, 128009}  # <|end_of_text|>, <|eom_id|>, <|eot_id|>


def test_user_defined_tokens_are_always_parsed_control_only_when_special(tmp_path):
    meta = tiny_gpt2_metadata(tmp_path, "default")
    meta["tokenizer.ggml.tokens"] = meta["tokenizer.ggml.tokens"] + ["<think>"]
    meta["tokenizer.ggml.token_type"] = meta["tokenizer.ggml.token_type"] + [USER_DEFINED]
    think = len(meta["tokenizer.ggml.tokens"]) - 1

    tok = GGUFTokenizer.from_metadata(meta, tmp_path / "t.gguf")

    assert think in tok.encode("a<think>b", bos=False)
    assert tok.token_to_id("<|im_end|>") not in tok.encode("a<|im_end|>", bos=False)
    assert tok.encode("a<|im_end|>", bos=False, special=True)[-1] == tok.token_to_id("<|im_end|>")
    assert tok.token_bytes(think) == b"<think>"


def test_sentencepiece_pieces_of_any_length_survive_the_model_proto():
    import sentencepiece as spm

    from llamarun.tokenizer.gguf import BYTE, UNKNOWN, model_proto

    long = "\u2581" + "x" * 200  # a piece and its message past one-byte varint lengths
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "\u2581a", long]
    types = [UNKNOWN, CONTROL, CONTROL, *[BYTE] * 256, NORMAL, NORMAL]
    scores = [0.0] * (len(tokens) - 2) + [-1.5, -2.25]
    proto = model_proto(
        tokens,
        scores,
        types,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        add_dummy_prefix=True,
    )
    sp = spm.SentencePieceProcessor(model_proto=proto)

    assert sp.get_piece_size() == len(tokens)
    assert [sp.id_to_piece(i) for i in range(len(tokens))] == tokens
    assert sp.get_score(len(tokens) - 1) == -2.25 and sp.is_byte(3) and sp.is_control(1)
    assert sp.encode("a") == [len(tokens) - 2]
