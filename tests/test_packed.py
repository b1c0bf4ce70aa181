"""GGUF blocks computed on in their own bytes: blocks.py's torch dequantization and the C++
kernels (through PackedLinear / PackedEmbedding) against gguf-py's dequantization and a float
matmul, for every block type, on random blocks; and a row's result is the same bit for bit
whatever batch it is in."""

from __future__ import annotations

import pytest
import torch

gguf = pytest.importorskip("gguf")

from tiny import random_blocks  # noqa: E402

from llamarun import cpu_kernels  # noqa: E402
from llamarun.blocks import BLOCK_SIZES, BLOCK_TYPES, dequantize_rows  # noqa: E402
from llamarun.errors import ConfigError  # noqa: E402
from llamarun.packed import PackedEmbedding, PackedLinear  # noqa: E402

OUT = 37  # odd: the two threads' shares of weight rows differ, and no tile divides it


def width(qtype: str) -> int:
    """Three K-quant super-blocks, or seven 32-blocks: not a multiple of any tile."""
    return 3 * 256 if BLOCK_SIZES[qtype][0] == 256 else 7 * 32


def reference(data, qtype: str) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype]).copy())


@pytest.mark.parametrize("qtype", BLOCK_TYPES)
def test_torch_dequantization_equals_gguf_py(qtype):
    data = random_blocks(qtype, OUT, width(qtype))

    got = dequantize_rows(torch.from_numpy(data), qtype, width(qtype))

    assert torch.equal(got, reference(data, qtype))


@pytest.mark.parametrize("qtype", BLOCK_TYPES)
@pytest.mark.parametrize("batch", [1, 2, 7, 16, 64])
def test_packed_linear_equals_the_dequantized_matmul(path, qtype, batch):
    K = width(qtype)
    data = random_blocks(qtype, OUT, K, seed=batch)
    x = torch.randn(batch, K, generator=torch.Generator().manual_seed(batch))
    x[:, :32] *= 50  # an outlier block, as real activations have
    layer = PackedLinear(qtype, K, OUT, torch.from_numpy(data))

    got = layer(x)

    expected = (x.double() @ reference(data, qtype).double().T).float()
    # the kernels quantize activations to 16 bits per 32, the byte-form K-quants' (Q2_K .. Q6_K)
    # to 15 bits of the max of 256: beside the x50 outlier block, the other weights of its 256
    # keep ~9 bits (measured 5e-5..1.6e-4, the others' 2e-5..3e-5); the torch path is float32
    # throughout
    byte_form = qtype in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
    tolerance = (3e-4 if byte_form else 1e-4) if path == "kernel" else 1e-5
    assert got.shape == (batch, OUT)
    assert ((got - expected).norm() / expected.norm()).item() < tolerance


@pytest.mark.parametrize("qtype", BLOCK_TYPES)
def test_packed_embedding_looks_up_the_dequantized_rows(path, qtype):
    K = width(qtype)
    data = random_blocks(qtype, OUT, K)
    table = PackedEmbedding(qtype, OUT, K, torch.from_numpy(data))
    tokens = torch.tensor([[3, 0, 36], [5, 5, 1]])

    got = table(tokens)

    # the kernels compute s * (sc * q) + m, gguf-py (d * sc) * q - m: the last bit may differ
    torch.testing.assert_close(got, reference(data, qtype)[tokens], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("qtype", BLOCK_TYPES)
def test_a_row_gives_the_same_bits_alone_and_anywhere_in_a_batch(qtype):
    if cpu_kernels.ops() is None:
        pytest.skip("no CPU kernels on this machine (needs x86 AVX2 and a C++ compiler)")
    K = width(qtype)
    layer = PackedLinear(qtype, K, OUT, torch.from_numpy(random_blocks(qtype, OUT, K)))
    x = torch.randn(9, K) * torch.logspace(-2, 2, 9)[:, None]  # rows of very different sizes
    batch = layer(x)

    for i in range(9):
        assert torch.equal(layer(x[i : i + 1])[0], batch[i])
    order = torch.tensor([4, 8, 0, 2, 7, 1, 6, 3, 5])
    assert torch.equal(layer(x[order]), batch[order])
    assert torch.equal(layer(x[2:5]), batch[2:5])  # three rows: the matrix-vector loop


def test_tied_classifier_reads_the_embedding_bytes():
    data = torch.from_numpy(random_blocks("Q6_K", OUT, 256))
    table = PackedEmbedding("Q6_K", OUT, 256, data)

    classifier = table.tied_linear()

    assert classifier.data.data_ptr() == table.data.data_ptr() == data.data_ptr()
    assert (classifier.in_features, classifier.out_features) == (256, OUT)


def test_rows_of_the_wrong_size_are_refused():
    with pytest.raises(
        ConfigError, match=r"packed Q4_K weight of shape \(4, 256\) needs uint8 rows of 144 bytes"
    ):
        PackedLinear("Q4_K", 256, 4, torch.zeros(4, 143, dtype=torch.uint8))


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_0", "Q6_K", "Q8_0"])
def test_a_prompts_tokens_multiply_float32_tiles_of_the_dequantized_rows(path, monkeypatch, qtype):
    monkeypatch.setattr(cpu_kernels, "PROMPT", "float32")  # (the integer GEMM: test_prompt_gemm.py)
    K = width(qtype)
    data = random_blocks(qtype, OUT, K)
    layer = PackedLinear(qtype, K, OUT, torch.from_numpy(data))
    x = torch.randn(2, 9, K)  # (B, T > 1, C): a prompt

    got = layer(x)

    expected = (x.double() @ reference(data, qtype).double().T).float()
    assert got.shape == (2, 9, OUT)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-6  # no activation rounding


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K", "Q6_K"])
def test_a_prompt_over_several_tiles_reuses_one_buffer_and_stays_exact(path, monkeypatch, qtype):
    monkeypatch.setattr(cpu_kernels, "PROMPT", "float32")
    K = width(qtype)
    monkeypatch.setattr(cpu_kernels, "TILE_BYTES", 4 * K * 5)  # 5 rows a tile: 8, the last of 2
    monkeypatch.setattr(cpu_kernels, "_TILES", type(cpu_kernels._TILES)())  # this test's own
    data, other = random_blocks(qtype, OUT, K, seed=1), random_blocks(qtype, OUT, K, seed=2)
    layer = PackedLinear(qtype, K, OUT, torch.from_numpy(data))
    second = PackedLinear(qtype, K, OUT, torch.from_numpy(other))
    x = torch.randn(1, 6, K)

    got, got_second = layer(x), second(x)  # the second layer's tiles overwrite the first's

    for out, blocks in ((got, data), (got_second, other)):
        expected = (x.double() @ reference(blocks, qtype).double().T).float()
        assert ((out - expected).norm() / expected.norm()).item() < 1e-6
    if path == "kernel":
        buf = cpu_kernels._TILES.bufs[torch.float32]
        layer(x)
        assert (
            cpu_kernels._TILES.bufs[torch.float32] is buf
        )  # no new tile buffer for the next prompt


@pytest.mark.parametrize("qtype", BLOCK_TYPES)
def test_gguf_rows_into_writes_the_dequantized_rows_in_place(qtype):
    ops = cpu_kernels.ops()
    if ops is None:
        pytest.skip("no CPU kernels on this machine (needs x86 AVX2 and a C++ compiler)")
    from llamarun.blocks import TYPE_IDS

    K = width(qtype)
    data = random_blocks(qtype, OUT, K)
    out = torch.full((9, K), float("nan"))

    ops.gguf_rows_into(torch.from_numpy(data), TYPE_IDS[qtype], K, 20, out)

    assert torch.equal(out, reference(data, qtype)[20:29])
    with pytest.raises(RuntimeError, match="out of range"):
        ops.gguf_rows_into(torch.from_numpy(data), TYPE_IDS[qtype], K, OUT - 8, out)


def test_a_prompts_gradient_survives_the_shared_tile_buffer(path, monkeypatch):
    K = width("Q4_K")
    monkeypatch.setattr(cpu_kernels, "TILE_BYTES", 4 * K * 5)  # several tiles, one buffer
    monkeypatch.setattr(cpu_kernels, "_TILES", type(cpu_kernels._TILES)())
    first, second = (random_blocks("Q4_K", OUT, K, seed=s) for s in (1, 2))
    layers = [PackedLinear("Q4_K", K, OUT, torch.from_numpy(b)) for b in (first, second)]
    x = torch.randn(1, 4, K, requires_grad=True)

    (layers[0](x).sum() + layers[1](x).sum()).backward()  # the second overwrites the buffer

    w = reference(first, "Q4_K") + reference(second, "Q4_K")
    assert torch.allclose(x.grad[0], w.sum(0).expand(4, K), rtol=1e-5, atol=1e-5)
