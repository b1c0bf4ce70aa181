"""Int8/Int4 layers against float nn.Linear, GGUF blocks against gguf-py, quantize_ and fuse_."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from torch import nn

from llamarun import cpu_kernels
from llamarun.errors import ConfigError
from llamarun.packed import PackedLinear
from llamarun.quantize import Int4Linear, Int8Linear, fuse_, quantize_
from llamarun.weights import PackedWeight


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm() / b.norm()).detach())


@pytest.mark.parametrize("in_features", [96, 100])  # 100: padded to 128 columns
def test_int8_linear_close_to_float(path, in_features):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, 48, bias=False)
    x = torch.randn(3, 5, in_features)
    # Act
    out = Int8Linear.from_float(linear.weight)(x)
    # Assert: int8 weights and (on the kernel path) int8 activations keep ~1% error
    assert out.shape == (3, 5, 48)
    assert rel_error(out, linear(x)) < 0.02


# (out, in): 33 and 70 leave a partial block of 16 weight rows; in 96 and 288 are not multiples
# of the 64-byte tile width; batches 17 and 40 span several tiles of 16 activation rows
@pytest.mark.parametrize(
    "out_features, in_features, batch", [(48, 64, 1), (33, 96, 5), (70, 288, 17), (40, 192, 40)]
)
def test_amx_int8_product_equals_dequantized_matmul(out_features, in_features, batch):
    ops = cpu_kernels.ops()
    if ops is None:
        pytest.skip("no CPU kernels on this machine (needs x86 AVX2 and a C++ compiler)")
    torch.manual_seed(0)
    layer = Int8Linear.from_float(torch.randn(out_features, in_features))
    x = torch.randn(batch, in_features) * torch.linspace(0.1, 3, in_features)
    out = ops.amx_int8_linear(x, layer.weight, layer.scales)
    if out.numel() == 0:
        pytest.skip("this CPU has no AMX tiles")
    # Assert: only the activations' two int8 levels per row (~15 bits) stand between them
    assert out.shape == (batch, out_features)
    assert rel_error(out, x @ layer.dequantize().T) < 1e-3


def test_int8_batches_agree_with_single_rows(path):
    """Batches may take another kernel (AMX tiles) than single rows: the rows must not change."""
    torch.manual_seed(0)
    layer = Int8Linear.from_float(torch.randn(70, 288))
    x = torch.randn(6, 288)
    rows = torch.cat([layer(x[i : i + 1]) for i in range(6)])
    assert rel_error(layer(x), rows) < 2e-3


@pytest.mark.parametrize("in_features", [96, 100])
def test_int4_linear_close_to_float(path, in_features):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, 48, bias=False)
    x = torch.randn(4, in_features)
    out = Int4Linear.from_float(linear.weight)(x)
    assert out.shape == (4, 48)
    assert rel_error(out, linear(x)) < 0.12  # 16 levels per group of 32


def test_int4_kernel_equals_dequantized_matmul(path):
    torch.manual_seed(1)
    layer = Int4Linear.from_float(torch.randn(40, 320), group_size=64)
    x = torch.randn(7, 320)  # batch 7: a tile of 4 rows plus 3 single rows
    expected = x @ layer.dequantize().T
    assert rel_error(layer(x), expected) < 0.01  # int8 activations only


def test_int4_group_64_is_coarser_than_32():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    err32 = rel_error(Int4Linear.from_float(w, 32).dequantize(), w)
    err64 = rel_error(Int4Linear.from_float(w, 64).dequantize(), w)
    assert err32 < err64 < 0.15


def min_max_int4(w: torch.Tensor) -> torch.Tensor:
    """Plain Q4_1 rounding per group of 32 (d = (max - min) / 15, m = min, float16), dequantized:
    the reference the searched quantizer must beat."""
    g = w.view(w.shape[0], -1, 32)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    d, m = ((hi - lo) / 15).half().float(), lo.half().float()
    q = torch.round((g - m) / d).clamp(0, 15)
    return (q * d + m).view_as(w)


def group_sq_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).square().view(a.shape[0], -1, 32).sum(-1)


def outlier_heavy(rows: int, cols: int) -> torch.Tensor:
    w = torch.distributions.StudentT(2.0).sample((rows, cols))  # heavy tails
    w[torch.rand(rows, cols) < 0.01] *= 20  # and a few big outliers
    return w


@pytest.mark.parametrize("kind", ["gaussian", "outliers"])
def test_int4_search_beats_min_max_rounding(kind):
    torch.manual_seed(0)
    w = torch.randn(64, 256) if kind == "gaussian" else outlier_heavy(64, 256)
    # Act
    got = Int4Linear.from_float(w).dequantize()
    # Assert: never worse in any group, and clearly better overall
    plain = min_max_int4(w)
    new_err, old_err = group_sq_error(got, w), group_sq_error(plain, w)
    assert bool((new_err <= old_err * (1 + 1e-4)).all())
    assert float(new_err.sum() / old_err.sum()) < 0.85


def test_int4_stored_layout_is_gguf_q4_1():
    torch.manual_seed(2)
    w = outlier_heavy(8, 64)
    layer = Int4Linear.from_float(w)
    # Arrange GGUF Q4_1 blocks by hand from the stored tensors: d, m (float16), 16 bytes of nibbles
    blocks = torch.cat(
        [
            layer.d.view(-1, 1).view(torch.uint8),
            layer.m.view(-1, 1).view(torch.uint8),
            layer.qs.view(-1, 16),
        ],
        dim=1,
    ).view(8, -1)
    # Act
    expected = gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType.Q4_1)
    # Assert: gguf-py reads the same weights
    assert torch.equal(layer.dequantize(), torch.from_numpy(expected))
    nibbles = layer.nibbles().float().view(8, -1, 32)
    manual = nibbles * layer.d.float()[..., None] + layer.m.float()[..., None]
    assert torch.equal(manual.view(8, -1), layer.dequantize())


def test_int4_keeps_weights_that_were_q4_1_exactly():
    rng = np.random.default_rng(3)
    packed = gguf_blocks(rng.standard_normal((16, 128)).astype(np.float32), "Q4_1")
    original = PackedLinear.from_packed(packed).dequantize()
    # Act: quantize the dequantized file again (what int4 does to a Q4_1 GGUF loaded as float)
    layer = Int4Linear.from_float(original)
    assert torch.equal(layer.dequantize(), original)


def test_int4_degenerate_groups_stay_finite():
    w = torch.zeros(4, 96)
    w[1] = 0.3  # constant rows: nothing to scale
    w[2, :32] = torch.linspace(-1, 1, 32)
    w[3, 5] = 1e-7  # one value below float16 precision
    got = Int4Linear.from_float(w).dequantize()
    assert bool(torch.isfinite(got).all())
    assert (got - w).abs().max() < 0.07


def test_int4_importance_lowers_error_where_it_counts():
    torch.manual_seed(4)
    w = outlier_heavy(32, 128)
    importance = torch.ones(128)
    importance[::4] = 50.0  # a norm gain of ~7 on every fourth input column
    plain = Int4Linear.from_float(w).dequantize()
    # Act
    weighted = Int4Linear.from_float(w, importance=importance).dequantize()

    # Assert: the error the output sees, sum importance * err^2, goes down
    def seen(a: torch.Tensor) -> float:
        return float(((a - w).square() * importance).sum())

    assert seen(weighted) < 0.97 * seen(plain)


def test_int4_importance_of_wrong_size_is_rejected():
    with pytest.raises(ConfigError, match="importance"):
        Int4Linear.from_float(torch.randn(4, 64), importance=torch.ones(32))


def test_quantize_int4_weighs_columns_by_the_norm_gain(tiny_model):
    block = tiny_model.layers[0]
    wq = block.attention.wq.weight.detach().clone()
    gain = block.attention_norm.weight.detach().clone()
    # Act
    quantize_(tiny_model, "int4")
    # Assert: wq's error on normalized inputs (x * gain) is that of the gain-weighted search,
    # lower than quantizing without it
    x = torch.randn(256, wq.shape[1]) * gain

    def output_error(layer_w: torch.Tensor) -> float:
        return rel_error(x @ layer_w.T, x @ wq.T)

    got = output_error(block.attention.wq.dequantize())
    assert got < output_error(Int4Linear.from_float(wq).dequantize())
    expected = Int4Linear.from_float(wq, importance=gain.square()).dequantize()
    assert torch.equal(block.attention.wq.dequantize(), expected)


def gguf_blocks(w: np.ndarray, qtype: str) -> PackedWeight:
    qt = gguf.GGMLQuantizationType[qtype]
    data = gguf.quants.quantize(w, qt)  # (out, bytes per row) uint8
    return PackedWeight(qtype, torch.from_numpy(data), tuple(w.shape))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_leaves_no_linear_and_keeps_embedding(tiny_model, mode):
    quantize_(tiny_model, mode)
    linears = [n for n, m in tiny_model.named_modules() if isinstance(m, nn.Linear)]
    assert linears == []
    assert isinstance(tiny_model.tok_embeddings, nn.Embedding)
    assert isinstance(tiny_model.output, Int8Linear)  # the classifier stays at 8 bits
    expected = Int8Linear if mode == "int8" else Int4Linear
    assert isinstance(tiny_model.layers[0].feed_forward.w2, expected)


def test_quantize_rejects_unknown_mode(tiny_model):
    with pytest.raises(ConfigError, match="int3"):
        quantize_(tiny_model, "int3")


def greedy(model, prompt: list[int], steps: int) -> list[int]:
    model.setup_caches(1, 64)
    tokens = list(prompt)
    with torch.inference_mode():
        for _ in range(steps):
            ids = torch.tensor([tokens])
            logits = model(ids, torch.arange(len(tokens))[None])
            tokens.append(int(logits[0].argmax()))
    return tokens[len(prompt) :]


@pytest.mark.parametrize("mode, min_agree", [("int8", 12), ("int4", 3)])
def test_quantized_greedy_tokens_follow_float(tiny_model, mode, min_agree):
    expected = greedy(tiny_model, [1, 5, 9], 12)
    quantize_(tiny_model, mode)
    got = greedy(tiny_model, [1, 5, 9], 12)
    agree = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), len(got))
    # A random tiny model has small logit margins: int4 may drift after a few tokens.
    assert agree >= min_agree


def test_quantized_logits_close_to_float(tiny_model):
    tiny_model.setup_caches(1, 16)
    tokens, pos = torch.tensor([[3, 1, 4, 1, 5, 9]]), torch.arange(6)[None]
    with torch.inference_mode():
        expected = tiny_model(tokens, pos, all_logits=True)
        quantize_(tiny_model, "int4")
        got = tiny_model(tokens, pos, all_logits=True)
    assert rel_error(got, expected) < 0.1


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_fused_quantized_equals_unfused(tiny_model, mode):
    quantize_(tiny_model, mode)
    tiny_model.setup_caches(1, 16)
    tokens, pos = torch.tensor([[3, 1, 4, 1, 5]]), torch.arange(5)[None]
    with torch.inference_mode():
        expected = tiny_model(tokens, pos, all_logits=True)
        fuse_(tiny_model)
        got = tiny_model(tokens, pos, all_logits=True)
    assert tiny_model.layers[0].attention.wqkv is not None
    assert not hasattr(tiny_model.layers[0].attention, "wq")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_stale_kernel_build_lock_is_removed_and_a_fresh_one_kept(tmp_path):
    import os
    import time
    from types import SimpleNamespace

    from llamarun import cpu_kernels

    fake = SimpleNamespace(_get_build_directory=lambda name, verbose: str(tmp_path))
    lock = tmp_path / "lock"
    lock.touch()
    cpu_kernels._clear_stale_lock(fake, "k")
    assert lock.exists()  # a build may be running right now
    old = time.time() - cpu_kernels.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    cpu_kernels._clear_stale_lock(fake, "k")
    assert not lock.exists()


@pytest.mark.parametrize("mode", ["int8", "int8-block", "int4"])
def test_a_prompts_tokens_multiply_dequantized_tiles_of_the_quantized_weight(monkeypatch, mode):
    if cpu_kernels.ops() is None:
        pytest.skip("no CPU kernels on this machine (needs x86 AVX2 and a C++ compiler)")
    monkeypatch.setattr(cpu_kernels, "PROMPT", "float32")  # (the integer GEMM: test_prompt_gemm.py)
    monkeypatch.setattr(
        cpu_kernels, "TILE_BYTES", 4 * 96 * 7
    )  # 7 rows a tile: 6 tiles, the last of 2
    monkeypatch.setattr(cpu_kernels, "_TILES", type(cpu_kernels._TILES)())
    w = torch.randn(37, 70, generator=torch.Generator().manual_seed(0))  # 70 columns: padded to 96
    if mode == "int4":
        layer = Int4Linear.from_float(w)
    elif mode == "int8":
        layer = Int8Linear.from_float(w)
    else:  # a scale per block of 32, as GGUF Q8_0's
        layer = Int8Linear(70, 37, per_block=True)
        layer.weight.random_(-127, 128, generator=torch.Generator().manual_seed(1))
        layer.scales.uniform_(0.001, 0.01)
    x = torch.randn(2, 5, 70)

    got = layer(x)

    expected = (x.double() @ layer.dequantize().double().T).float()
    assert ((got - expected).norm() / expected.norm()).item() < 1e-6  # no activation rounding
    if mode == "int4":
        tile = torch.empty(9, 96)
        cpu_kernels.ops().q4_rows_into(layer.qs, layer.d, layer.m, 20, tile)
        assert torch.equal(tile[:, :70], layer.dequantize()[20:29])


def test_the_tile_buffer_made_under_inference_mode_serves_outside_it(monkeypatch):
    if cpu_kernels.ops() is None:
        pytest.skip("no CPU kernels on this machine (needs x86 AVX2 and a C++ compiler)")
    monkeypatch.setattr(cpu_kernels, "_TILES", type(cpu_kernels._TILES)())
    layer = Int8Linear.from_float(torch.randn(8, 64))  # its tiles are written by torch.mul(out=)
    x = torch.randn(1, 3, 64)
    with torch.inference_mode():  # an engine's prompt makes the buffer
        inside = layer(x)

    assert torch.equal(layer(x), inside)  # a plain call (a perplexity run, a test) writes it
