"""`llamarun perplexity` against exp(mean NLL) computed directly with cross_entropy."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_llama2c import write_llama2c
from tiny_tokenizers import TEXT, write_sentencepiece

import llamarun
from llamarun.cli import main


@pytest.fixture
def files(tiny_model, tmp_path):
    model = write_llama2c(tmp_path / "tiny.bin", tiny_model)
    tokenizer = write_sentencepiece(tmp_path)
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 3)
    return model, tokenizer, text


def direct_perplexity(model_path, tokenizer_path, text: str, ctx: int) -> float:
    llm = llamarun.load(model_path, tokenizer=tokenizer_path, max_seq_len=ctx)
    ids = llm.encode(text)
    nlls = []
    with torch.inference_mode():
        for start in range(0, len(ids) // ctx * ctx, ctx):
            chunk = torch.tensor([[llm.tokenizer.bos_id, *ids[start + 1 : start + ctx]]])
            logits = llm.model(chunk, torch.arange(ctx)[None], all_logits=True)[0]
            half = ctx // 2
            nlls.append(F.cross_entropy(logits[half:-1], chunk[0, half + 1 :], reduction="none"))
    return math.exp(torch.cat(nlls).mean())


def test_perplexity_equals_exp_mean_nll(files, capsys):
    model, tokenizer, text = files
    code = main(
        [
            "perplexity",
            str(model),
            str(text),
            "--tokenizer",
            str(tokenizer),
            "--ctx",
            "16",
            "--json",
        ]
    )
    out = capsys.readouterr()
    result = json.loads(out.out)
    assert code == 0
    assert result["perplexity"] == pytest.approx(
        direct_perplexity(model, tokenizer, text.read_text(), 16), rel=1e-4
    )
    assert result["scored_tokens"] == result["chunks"] * 7  # positions 8..14 predict tokens 9..15
    assert "[1/" in out.err


def test_perplexity_needs_one_chunk(files, capsys):
    model, tokenizer, text = files
    code = main(
        ["perplexity", str(model), str(text), "--tokenizer", str(tokenizer), "--ctx", "100000"]
    )
    assert code == 2
    assert "--ctx" in capsys.readouterr().err
