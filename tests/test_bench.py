"""`llamarun bench` on a tiny llama2.c checkpoint written in tmp_path."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_llama2c import write_llama2c

from llamarun.cli import main
from llamarun.cli.bench import weight_bytes_per_step
from llamarun.quantize import quantize_

FIELDS = {
    "prefill_tok_s",
    "decode_tok_s",
    "decode_gbs",
    "weight_bytes_per_step",
    "memory_bandwidth_gbs",
    "bandwidth_fraction",
    "peak_rss_mb",
    "load_s",
    "batch",
    "prompt_len",
    "gen_len",
    "decode_steps",
    "kv_cache_mb",
    "prefix_cache_mb",
}


@pytest.fixture
def checkpoint(tiny_model, tmp_path):
    return write_llama2c(tmp_path / "tiny.bin", tiny_model)


@pytest.mark.parametrize("extra", [[], ["--quantize", "int8", "--batch", "3"]])
def test_bench_json_has_the_figures(checkpoint, capsys, extra):
    code = main(["bench", str(checkpoint), "--prompt-len", "8", "--gen-len", "5", "--json", *extra])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert FIELDS <= report.keys()
    assert report["decode_steps"] == 4  # the first new token comes from the prefill
    assert report["decode_tok_s"] > 0 and report["prefill_tok_s"] > 0
    assert 0 < report["bandwidth_fraction"] and report["peak_rss_mb"] > 10


def test_bench_reports_the_kv_rows_apart(checkpoint, tiny_args, capsys):
    # the memory bound counts the KV rows apart from the weights: the cache of the run's
    # batch x (prompt + gen + 1) positions, and the prompt chunks the prefix cache saved
    argv = ["bench", str(checkpoint), "--prompt-len", "8", "--gen-len", "5", "--batch", "2"]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    a = tiny_args
    head_dim = a.dim // a.n_heads
    kv = a.n_layers * 2 * 2 * (a.n_kv_heads or a.n_heads) * (8 + 5 + 1) * head_dim * 4
    assert report["kv_cache_mb"] * 2**20 == kv
    assert report["prefix_cache_mb"] == 0  # a prompt's unfinished last chunk is not saved


def test_bench_reports_speculation(checkpoint, capsys):
    argv = ["bench", str(checkpoint), "--prompt-len", "8", "--gen-len", "12", "--json"]
    assert main([*argv, "--draft", "int8"]) == 0
    report = json.loads(capsys.readouterr().out)
    spec = report["speculation"]
    assert spec["method"].startswith("self-draft int8") and spec["rounds"] > 0
    assert report["decode_tokens"] == 11  # the same tokens, in fewer forwards
    assert report["decode_steps"] < 11 and spec["tokens_per_forward"] > 1


def test_bench_rejects_zero_batch(checkpoint, capsys):
    assert main(["bench", str(checkpoint), "--batch", "0"]) == 2
    assert "--batch" in capsys.readouterr().err


def test_weight_bytes_count_quantized_buffers(tiny_model, tiny_args):
    float_bytes = weight_bytes_per_step(tiny_model)
    tiny_model.setup_caches(2, 32)  # caches and rope tables are not weights
    assert weight_bytes_per_step(tiny_model) == float_bytes
    quantize_(tiny_model, "int8")
    embedding = tiny_args.vocab_size * tiny_args.dim * 4
    linears = sum(
        p.numel()
        for n, p in tiny_model.named_buffers()
        if n.endswith(".weight") and p.dtype == torch.int8
    )
    assert linears < weight_bytes_per_step(tiny_model) < float_bytes - embedding
