"""Tiny tokenizer files for tests, each built in milliseconds and small enough (<= 320 tokens) for
the tiny test model (vocab_size 320): SentencePiece BPE with byte fallback, the llama2.c
tokenizer.bin exported from it, a tiktoken rank file with Llama-3-style special tokens, and a
Hugging Face byte-level BPE tokenizer.json.
"""

from __future__ import annotations

import base64
import collections
import io
import json
import struct
from pathlib import Path

import regex

TEXT = """Once upon a time, there was a little girl named Lily. She loved to play outside in the park.
One day, she saw a big red ball. She wanted to play with it, but it was too high.
The cat sat on the mat. The dog ran to the tree and the bird sang a song.
Tom and Sam like to eat apples and bananas. They are happy when the sun is out.
Lily's mom said, "Let's go home." They walked home together and had a nice dinner.
"""

# Meta's Llama 3 pre-tokenizer pattern (llama-models llama3/tokenizer.py)
LLAMA3_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def write_sentencepiece(directory: Path, vocab_size: int = 300) -> Path:
    """A SentencePiece BPE model with byte fallback: <unk> <s> </s>, 256 <0xNN> pieces, then merges."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT.splitlines() * 20),
        model_writer=out,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        num_threads=1,
        minloglevel=2,
    )
    path = Path(directory) / "tokenizer.model"
    path.write_bytes(out.getvalue())
    return path


def write_llama2c_tokenizer(sp_model_path: Path, out_path: Path) -> Path:
    """llama2.c tokenizer.bin from a SentencePiece model, as llama2.c's tokenizer.py export writes it:
    uint32 max_token_length, then per token float32 score, uint32 length, utf-8 bytes."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model_path))
    tokens, scores = [], []
    for i in range(sp.vocab_size()):
        piece = sp.id_to_piece(i)
        if i == sp.bos_id():
            piece = "\n<s>\n"
        elif i == sp.eos_id():
            piece = "\n</s>\n"
        tokens.append(piece.replace("\u2581", " ").encode("utf-8"))
        scores.append(sp.get_score(i))
    out = Path(out_path)
    with open(out, "wb") as f:
        f.write(struct.pack("<I", max(len(t) for t in tokens)))
        for data, score in zip(tokens, scores):
            f.write(struct.pack("<fI", score, len(data)))
            f.write(data)
    return out


def _bpe_merges(n_merges: int) -> list[bytes]:
    """Byte-level BPE merges learnt on TEXT (pre-split with the Llama 3 pattern), in rank order."""
    words = collections.Counter(
        tuple(bytes([b]) for b in w.encode()) for w in regex.findall(LLAMA3_PATTERN, TEXT)
    )
    merges: list[bytes] = []
    for _ in range(n_merges):
        pairs: collections.Counter = collections.Counter()
        for word, count in words.items():
            for a, b in zip(word, word[1:]):
                pairs[a, b] += count
        (a, b), _count = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append(a + b)
        merged: collections.Counter = collections.Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


def write_tiktoken(directory: Path, n_merges: int = 40) -> Path:
    """A tiktoken rank file (`base64 rank` lines): 256 byte ranks then `n_merges` merges. Loaded
    as a Llama 3 tokenizer, its special tokens follow the base ranks (256 + n_merges + 11 <= 320)."""
    ranks = [bytes([b]) for b in range(256)] + _bpe_merges(n_merges)
    path = Path(directory) / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ranks)))
    return path


def write_hf_tokenizer(
    directory: Path, vocab_size: int = 300, *, bos_in_post_processor: bool = False
) -> Path:
    """A byte-level BPE tokenizer.json (ids 0-1: <s> </s>) with tokenizer_config.json beside it.

    bos_in_post_processor: add BOS with a template post-processor (as Llama 3 on the hub does)
    instead of `add_bos_token` in tokenizer_config.json.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXT.splitlines() * 20, trainer=trainer)
    config = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "add_bos_token": not bos_in_post_processor,
        "add_eos_token": False,
    }
    if bos_in_post_processor:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
        )
        del config["add_bos_token"]
    directory = Path(directory)
    path = directory / "tokenizer.json"
    tok.save(str(path))
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return path
