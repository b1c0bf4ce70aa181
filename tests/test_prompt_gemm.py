"""A prompt's tokens against GGUF block weights: the 8-bit integer GEMM (csrc/gemm_gguf.cpp,
cpu_kernels.PROMPT int16 / int8) against gguf-py's dequantization and a float64 matmul, for every
block type and llamarun's own int8 / int4 layers, prompt lengths around its row tiles and widths that are not whole panels; each
prompt row's result the same bit for bit alone and among others; and which path PackedLinear
takes for which choice."""

from __future__ import annotations

import pytest
import torch

gguf = pytest.importorskip("gguf")

from tiny import random_blocks  # noqa: E402

from llamarun import cpu_kernels  # noqa: E402
from llamarun.blocks import BLOCK_SIZES, BLOCK_TYPES, TYPE_IDS  # noqa: E402
from llamarun.packed import PackedLinear  # noqa: E402
from llamarun.quantize import Int4Linear, Int8Linear  # noqa: E402

gemm = pytest.mark.skipif(
    cpu_kernels.ops() is None or not cpu_kernels._state.get("prompt_gemm"),
    reason=f"the prompt GEMM needs the C++ kernels: {cpu_kernels.describe()}",
)

OUT = 45  # one whole panel of 32 weight rows and a part of one


def width(qtype: str) -> int:
    return 3 * 256 if BLOCK_SIZES[qtype][0] == 256 else 9 * 32


def reference(data, qtype: str) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype]).copy())


def rel(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected).norm() / expected.norm()).item()


@gemm
@pytest.mark.parametrize("qtype", BLOCK_TYPES)
@pytest.mark.parametrize("rows", [2, 7, 16, 64, 67])
def test_the_gemm_is_the_dequantized_product_to_its_activations_precision(qtype, rows):
    K = width(qtype)
    data = random_blocks(qtype, OUT, K, seed=rows)
    w = torch.from_numpy(data)
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows))
    expected = x.double() @ reference(data, qtype).double().T

    two = cpu_kernels.ops().gguf_prompt_linear(x, w, TYPE_IDS[qtype], K, 2)
    one = cpu_kernels.ops().gguf_prompt_linear(x, w, TYPE_IDS[qtype], K, 1)

    assert two.shape == one.shape == (rows, OUT)
    assert rel(two, expected) < 1e-4  # two int8 levels: about 15 bits
    assert 1e-3 < rel(one, expected) < 2e-2  # one level: 8 bits (and it is not the other path)


@gemm
@pytest.mark.parametrize("qtype", ["Q4_K", "Q3_K", "Q8_0"])
def test_many_panels_meet_the_prompt_in_chunks_as_one_panel_alone(qtype):
    # 775 weight rows of 768: 25 panels, several chunks of ~256 KB unpacked on each thread; each
    # output is the same bits as from its rows' panel alone, and the product is the dequantized one
    K, N = 768, 775
    data = random_blocks(qtype, N, K, seed=9)
    w = torch.from_numpy(data)
    x = torch.randn(21, K, generator=torch.Generator().manual_seed(9))
    whole = cpu_kernels.ops().gguf_prompt_linear(x, w, TYPE_IDS[qtype], K, 2)
    for lo, hi in ((0, 32), (160, 192), (736, 775)):
        part = cpu_kernels.ops().gguf_prompt_linear(x, w[lo:hi].contiguous(), TYPE_IDS[qtype], K, 2)
        assert torch.equal(part, whole[:, lo:hi]), (lo, hi)
    assert rel(whole, x.double() @ reference(data, qtype).double().T) < 1e-4


@gemm
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K", "Q6_K", "Q2_K", "Q8_0"])
def test_a_prompt_row_is_the_same_alone_and_anywhere_among_others(qtype):
    K = width(qtype)
    w = torch.from_numpy(random_blocks(qtype, OUT, K, seed=5))
    x = torch.randn(70, K, generator=torch.Generator().manual_seed(3))
    for levels in (1, 2):
        whole = cpu_kernels.ops().gguf_prompt_linear(x, w, TYPE_IDS[qtype], K, levels)
        for lo, hi in ((0, 1), (5, 8), (61, 70), (3, 67)):
            part = cpu_kernels.ops().gguf_prompt_linear(x[lo:hi], w, TYPE_IDS[qtype], K, levels)
            assert torch.equal(part, whole[lo:hi]), (levels, lo, hi)


@gemm
def test_a_signed_offset_cancels_exactly_on_a_constant_input():
    # Q8_0 weights meet the GEMM as q + 128 and the offset leaves through the activations' sums,
    # in integers: a row of equal activations against weights whose signed bytes sum to zero
    # gives exactly zero
    K = 64
    data = random_blocks("Q8_0", 4, K, seed=1)
    blocks = data.reshape(4, K // 32, 34)
    blocks[..., 2:18] = 7
    blocks[..., 18:34] = 256 - 7  # -7
    w = torch.from_numpy(data)
    x = torch.full((3, K), 0.5)

    got = cpu_kernels.ops().gguf_prompt_linear(x, w, TYPE_IDS["Q8_0"], K, 2)

    assert torch.equal(got, torch.zeros(3, 4))


@gemm
@pytest.mark.parametrize("choice, levels", [("int16", 2), ("int8", 1)])
def test_packed_prompts_take_the_gemm_and_single_tokens_the_one_token_kernel(
    monkeypatch, choice, levels
):
    monkeypatch.setattr(cpu_kernels, "PROMPT", choice)
    K = width("Q4_K")
    w = torch.from_numpy(random_blocks("Q4_K", OUT, K, seed=2))
    layer = PackedLinear("Q4_K", K, OUT, w)
    ops = cpu_kernels.ops()
    prompt, tokens = torch.randn(2, 9, K), torch.randn(3, 1, K)

    assert torch.equal(
        layer(prompt), ops.gguf_prompt_linear(prompt, w, TYPE_IDS["Q4_K"], K, levels)
    )
    assert torch.equal(layer(tokens), ops.gguf_linear(tokens, w, TYPE_IDS["Q4_K"], K))


@gemm
def test_float32_prompts_and_autograd_keep_the_float32_tiles(monkeypatch):
    K = width("Q5_0")
    data = random_blocks("Q5_0", OUT, K, seed=4)
    layer = PackedLinear("Q5_0", K, OUT, torch.from_numpy(data))
    x = torch.randn(1, 6, K)
    expected = x.double() @ reference(data, "Q5_0").double().T

    assert rel(layer(x), expected) > 1e-7  # int16 by default: rounded activations
    monkeypatch.setattr(cpu_kernels, "PROMPT", "float32")
    assert rel(layer(x), expected) < 1e-6
    monkeypatch.setattr(cpu_kernels, "PROMPT", "int16")
    x.requires_grad_(True)
    y = layer(x)
    assert rel(y.detach(), expected) < 1e-6 and y.requires_grad


def test_without_the_gemm_prompts_take_float32_tiles(monkeypatch):
    monkeypatch.setitem(cpu_kernels._state, "prompt_gemm", False)
    assert cpu_kernels.prompt_levels() == 0
    monkeypatch.setattr(cpu_kernels, "PROMPT", "float32")
    assert cpu_kernels.prompt_levels() == 0


@gemm
def test_describe_names_the_prompt_path(monkeypatch):
    assert cpu_kernels.describe().endswith("; GGUF prompts: the integer GEMM, int16")
    monkeypatch.setattr(cpu_kernels, "PROMPT", "int8")
    assert cpu_kernels.describe().endswith("; GGUF prompts: the integer GEMM, int8")
    monkeypatch.setattr(cpu_kernels, "PROMPT", "bfloat16")
    assert cpu_kernels.describe().endswith("; GGUF prompts: bfloat16 tiles")


@gemm
def test_an_empty_prompt_gives_an_empty_product():
    w = torch.from_numpy(random_blocks("Q4_0", OUT, 64, seed=1))
    got = cpu_kernels.ops().gguf_prompt_linear(torch.empty(0, 64), w, TYPE_IDS["Q4_0"], 64, 2)
    assert got.shape == (0, OUT)


def own_layers(K: int) -> dict[str, torch.nn.Module]:
    """llamarun's own int8 (per channel and per block of 32) and 4-bit layers of width K."""
    g = torch.Generator().manual_seed(K)
    w = torch.randn(OUT, K, generator=g)
    per_block = Int8Linear(K, OUT, per_block=True)
    per_block.weight = torch.randint(-127, 128, per_block.weight.shape, generator=g).to(torch.int8)
    per_block.scales = torch.rand(per_block.scales.shape, generator=g) / 100
    return {
        "int8": Int8Linear.from_float(w),
        "int8 per block": per_block,
        "int4": Int4Linear.from_float(w),
    }


@gemm
@pytest.mark.parametrize("K", [70, 256])  # 70: padded to 96 columns
@pytest.mark.parametrize("kind", ["int8", "int8 per block", "int4"])
def test_own_int8_and_int4_prompts_take_the_gemm(monkeypatch, K, kind):
    layer = own_layers(K)[kind]
    x = torch.randn(2, 9, K, generator=torch.Generator().manual_seed(1))
    expected = x.double() @ layer.dequantize()[:, :K].double().T

    monkeypatch.setattr(cpu_kernels, "PROMPT", "float32")
    tiles = layer(x)
    monkeypatch.setattr(cpu_kernels, "PROMPT", "int16")
    two = layer(x)
    monkeypatch.setattr(cpu_kernels, "PROMPT", "int8")
    one = layer(x)

    assert rel(tiles, expected) < 1e-6
    assert 1e-7 < rel(two, expected) < 1e-4
    assert 1e-3 < rel(one, expected) < 2e-2
    monkeypatch.setattr(cpu_kernels, "PROMPT", "int16")  # each row alone, in prompts of 2
    for b in range(2):
        for t in (0, 7):
            assert torch.equal(layer(x[b : b + 1, t : t + 2]), two[b : b + 1, t : t + 2])


@gemm
def test_prompt_levels_refuse_inputs_the_gemm_cannot_take(monkeypatch):
    x = torch.randn(1, 4, 64)
    assert cpu_kernels.prompt_levels(x) == 2
    assert cpu_kernels.prompt_levels(x.bfloat16()) == 0
    assert cpu_kernels.prompt_levels(x.requires_grad_(True)) == 0  # no backward
    with torch.no_grad():
        assert cpu_kernels.prompt_levels(x) == 2
    monkeypatch.setattr(cpu_kernels, "PROMPT", "int8")
    assert cpu_kernels.prompt_levels(x.detach()) == 1
