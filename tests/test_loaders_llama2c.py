"""llama2.c .bin loader: v0 / v1 files give the original model's logits exactly, v2 (Q8_0) those
of the dequantized weights; fp32 weights are views of the file; damaged files name their sizes."""

from __future__ import annotations

import struct
import subprocess
import sys

import pytest
import torch
from tiny_llama2c import dequantize_q80, quantize_q80, write_llama2c
from tiny_tokenizers import write_llama2c_tokenizer, write_sentencepiece

import llamarun
from llamarun.errors import CheckpointError
from llamarun.loaders import load_checkpoint
from llamarun.model import Transformer
from llamarun.sniff import detect_format, expected_v0_size


def _tied(model: Transformer) -> Transformer:
    from dataclasses import replace

    tied = Transformer(replace(model.args, tie_embeddings=True))
    tied.load_state_dict(model.state_dict())
    tied.output.weight = tied.tok_embeddings.weight
    return tied.eval()


@torch.no_grad()
def _logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    model.setup_caches(1, 32)
    return model(tokens, torch.arange(tokens.shape[1])[None], all_logits=True)[0]  # (T, V)


TOKENS = torch.tensor([[1, 17, 200, 5, 99, 319, 42, 7]])


@pytest.mark.parametrize("version", [0, 1])
@pytest.mark.parametrize("tied", [False, True])
def test_fp32_versions_give_the_original_logits(tmp_path, tiny_model, version, tied):
    model = _tied(tiny_model) if tied else tiny_model
    path = write_llama2c(tmp_path / "model.bin", model, version)

    llm = llamarun.load(path)

    assert llm.info["format"] == "llama2c"
    assert llm.model.args.tie_embeddings == tied
    torch.testing.assert_close(
        _logits(llm.model, TOKENS), _logits(model, TOKENS), atol=1e-5, rtol=1e-5
    )


def test_v0_and_v1_load_identical_canonical_weights(tmp_path, tiny_model):
    v0 = load_checkpoint(write_llama2c(tmp_path / "v0.bin", tiny_model, 0))
    v1 = load_checkpoint(write_llama2c(tmp_path / "v1.bin", tiny_model, 1))

    assert v0.args == v1.args
    assert v0.args.norm_eps == 1e-5 and v0.args.rope_theta == 10000.0  # implied by llama2.c
    state = tiny_model.state_dict()
    for ckpt in (v0, v1):
        assert set(ckpt.weights) == set(state)
        for name, w in ckpt.weights.items():
            assert torch.equal(w, state[name]), name


@pytest.mark.parametrize("group_size", [16, 64])
def test_v2_dequantizes_q8_0_groups(tmp_path, tiny_model, group_size):
    path = write_llama2c(tmp_path / "q8.bin", tiny_model, 2, group_size=group_size)
    ckpt = load_checkpoint(path)

    w = tiny_model.state_dict()["layers.1.feed_forward.w2.weight"]
    expected = dequantize_q80(*quantize_q80(w, group_size), tuple(w.shape))
    assert ckpt.weights["layers.1.feed_forward.w2.weight"].dtype == torch.float32
    torch.testing.assert_close(
        ckpt.weights["layers.1.feed_forward.w2.weight"], expected, atol=0, rtol=0
    )
    assert torch.equal(
        ckpt.weights["norm.weight"], tiny_model.norm.weight.detach()
    )  # norms stay fp32


def test_v2_logits_match_the_dequantized_model_and_are_close_to_the_original(tmp_path, tiny_model):
    path = write_llama2c(tmp_path / "q8.bin", tiny_model, 2)
    dequantized = Transformer(tiny_model.args)
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    for name, w in state.items():
        if w.ndim == 2:
            state[name] = dequantize_q80(*quantize_q80(w, 64), tuple(w.shape))
    dequantized.load_state_dict(state)

    llm = llamarun.load(path)

    got = _logits(llm.model, TOKENS)
    torch.testing.assert_close(got, _logits(dequantized.eval(), TOKENS), atol=1e-5, rtol=1e-5)
    original = _logits(tiny_model, TOKENS)
    assert (got - original).abs().max() < 0.05 * original.abs().max()
    assert torch.equal(got.argmax(-1), original.argmax(-1))


def test_fp32_weights_are_views_of_the_file_not_copies(tmp_path, tiny_model):
    path = write_llama2c(tmp_path / "v1.bin", tiny_model, 1)
    w = load_checkpoint(path).weights
    C, L = tiny_model.args.dim, tiny_model.args.n_layers

    # v1 stores the final norm right before the embedding, and wq of layer 0 right after it
    assert w["tok_embeddings.weight"].data_ptr() - w["norm.weight"].data_ptr() == 4 * C
    embedding_bytes = 4 * tiny_model.args.vocab_size * C
    assert (
        w["layers.0.attention.wq.weight"].data_ptr() - w["tok_embeddings.weight"].data_ptr()
        == embedding_bytes
    )
    assert (
        w["layers.0.attention_norm.weight"].data_ptr()
        - w["layers.1.attention_norm.weight"].data_ptr()
        == -4 * C
    )
    assert L == 2


def test_expected_v0_size_counts_shared_and_unshared_classifier(tiny_model, tmp_path):
    a = tiny_model.args
    sizes = expected_v0_size(
        a.dim, a.hidden_dim, a.n_layers, a.n_heads, a.n_kv_heads, a.vocab_size, a.max_seq_len
    )

    unshared = write_llama2c(tmp_path / "u.bin", tiny_model, 0).stat().st_size
    shared = write_llama2c(tmp_path / "s.bin", _tied(tiny_model), 0).stat().st_size
    assert sizes == {shared, unshared}
    assert unshared - shared == 4 * a.vocab_size * a.dim


def test_tokenizer_beside_the_checkpoint_is_found_by_contents(tmp_path, tiny_model):
    sp = write_sentencepiece(tmp_path)  # 300 pieces, tiny model has 320 rows
    write_llama2c_tokenizer(sp, tmp_path / "vocab.dat")
    sp.rename(tmp_path / "spm.data")  # names carry no meaning
    path = write_llama2c(tmp_path / "weights.bin", tiny_model, 0)

    ckpt = load_checkpoint(path)

    assert type(ckpt.tokenizer).__name__ == "SentencePieceTokenizer"  # preferred over tokenizer.bin
    (tmp_path / "spm.data").unlink()
    assert type(load_checkpoint(path).tokenizer).__name__ == "Llama2cTokenizer"


def test_no_tokenizer_beside_the_checkpoint_loads_without_one(tmp_path, tiny_model):
    ckpt = load_checkpoint(write_llama2c(tmp_path / "model.bin", tiny_model, 1))
    assert ckpt.tokenizer is None


@pytest.mark.parametrize("version", [0, 1, 2])
def test_truncated_file_names_the_file_and_both_sizes(tmp_path, tiny_model, version):
    path = write_llama2c(tmp_path / "model.bin", tiny_model, version)
    full = path.stat().st_size
    path.write_bytes(path.read_bytes()[: full - 1000])

    with pytest.raises(CheckpointError, match="truncated") as e:
        load_checkpoint(path)

    assert (
        str(path) in str(e.value) and str(full) in str(e.value) and str(full - 1000) in str(e.value)
    )


def test_trailing_bytes_are_reported(tmp_path, tiny_model):
    path = write_llama2c(tmp_path / "model.bin", tiny_model, 1)
    with open(path, "ab") as f:
        f.write(b"\0" * 16)
    with pytest.raises(CheckpointError, match="longer than its header says"):
        load_checkpoint(path)


def test_v0_header_sign_must_match_the_size(tmp_path, tiny_model):
    path = write_llama2c(tmp_path / "model.bin", tiny_model, 0)  # unshared: vocab written negative
    data = bytearray(path.read_bytes())
    data[20:24] = struct.pack("<i", tiny_model.args.vocab_size)  # claim a shared classifier
    path.write_bytes(bytes(data))
    assert detect_format(path) == "llama2c"  # the size fits the other reading

    with pytest.raises(CheckpointError, match="longer than its header says"):
        load_checkpoint(path)


def test_inconsistent_header_is_reported(tmp_path, tiny_model):
    path = write_llama2c(tmp_path / "model.bin", tiny_model, 1)
    data = bytearray(path.read_bytes())
    data[20:24] = struct.pack("<i", 3)  # n_heads 3 does not divide dim 64
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="inconsistent llama2.c header"):
        load_checkpoint(path)


def test_unknown_version_is_reported(tmp_path, tiny_model):
    path = write_llama2c(tmp_path / "model.bin", tiny_model, 1)
    data = bytearray(path.read_bytes())
    data[4:8] = struct.pack("<i", 7)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="version 7"):
        load_checkpoint(path)


def test_v2_bad_group_size_is_reported(tmp_path, tiny_model):
    path = write_llama2c(tmp_path / "model.bin", tiny_model, 2)
    data = bytearray(path.read_bytes())
    data[37:41] = struct.pack("<i", 7)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="group_size 7"):
        load_checkpoint(path)


PEAK_RSS = """
import gc, sys, psutil, torch, llamarun
from llamarun.config import ModelArgs
path = sys.argv[1]
# warm up: the first meta-device model and forward import torch modules (~70 MB, whatever the size)
with torch.device("meta"):
    warm = llamarun.Transformer(ModelArgs(dim=8, n_layers=1, n_heads=2, vocab_size=8, hidden_dim=8))
warm = warm.to_empty(device="cpu")
warm.setup_caches(1, 4)
warm(torch.tensor([[1]]), torch.zeros(1, 1, dtype=torch.long))
gc.collect()
before = psutil.Process().memory_info().rss
llm = llamarun.load(path, max_seq_len=16)
llm.model(torch.tensor([[1, 2, 3]]), torch.arange(3)[None])  # touch every weight
# VmHWM: this process's peak RSS (ru_maxrss would include the forking parent's, kept across exec)
status = open("/proc/self/status").read()
peak = int(status.split("VmHWM:")[1].split()[0]) * 1024
print(max(peak, psutil.Process().memory_info().rss) - before)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_memory_while_loading_stays_under_1_3x_the_file(tmp_path):
    from llamarun.config import ModelArgs

    torch.manual_seed(0)
    args = ModelArgs(
        dim=512,
        n_layers=4,
        n_heads=8,
        n_kv_heads=4,
        hidden_dim=1536,
        vocab_size=16384,
        max_seq_len=64,
    )
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device="cpu")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    path = write_llama2c(tmp_path / "big.bin", model, 1)
    del model
    size = path.stat().st_size

    out = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, str(path)], capture_output=True, text=True, check=True
    )

    grown = int(out.stdout.split()[-1])
    print(
        f"peak RSS growth while loading + one forward: {grown} bytes = {grown / size:.3f}x the {size}-byte file"
    )
    assert grown < 1.3 * size, f"peak RSS grew by {grown / size:.2f}x the file size ({size} bytes)"


def test_a_folder_with_one_llama2c_file_loads_it(tmp_path, tiny_model):
    path = write_llama2c(tmp_path / "model.bin", tiny_model, 1)
    write_llama2c_tokenizer(write_sentencepiece(tmp_path), tmp_path / "tokenizer.bin")

    assert detect_format(tmp_path) == "llama2c"
    ckpt = load_checkpoint(tmp_path)

    assert ckpt.path == path and ckpt.tokenizer is not None
