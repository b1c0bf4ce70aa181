"""LLAMARUN_CPU_PROMPT_DTYPE=bfloat16: a prompt's tiles are dequantized straight into bfloat16 (the
kernels round each value to nearest even, as torch does) and meet bfloat16 activations in torch's
GEMM; the result comes back in float32, close to the float32 product. int8 layers keep float32
tiles. The default is the integer GEMM (test_prompt_gemm.py); float32 tiles are its reference."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("gguf")

from test_packed import OUT, width  # noqa: E402
from tiny import random_blocks  # noqa: E402

from llamarun import cpu_kernels  # noqa: E402
from llamarun.blocks import BLOCK_TYPES, TYPE_IDS  # noqa: E402
from llamarun.packed import PackedLinear  # noqa: E402
from llamarun.quantize import Int4Linear, Int8Linear  # noqa: E402

kernels = pytest.mark.skipif(
    cpu_kernels.ops() is None, reason="no CPU kernels here (needs x86 AVX2 and a C++ compiler)"
)


@kernels
@pytest.mark.parametrize("qtype", BLOCK_TYPES)
def test_gguf_rows_into_bfloat16_is_the_float32_rows_rounded(qtype):
    K = width(qtype)
    w = torch.from_numpy(random_blocks(qtype, OUT, K, seed=3))
    f32, bf16 = torch.empty(OUT - 5, K), torch.empty(OUT - 5, K, dtype=torch.bfloat16)

    cpu_kernels.ops().gguf_rows_into(w, TYPE_IDS[qtype], K, 5, f32)
    cpu_kernels.ops().gguf_rows_into(w, TYPE_IDS[qtype], K, 5, bf16)

    assert torch.equal(bf16, f32.bfloat16())


@kernels
def test_q4_rows_into_bfloat16_is_the_float32_rows_rounded():
    layer = Int4Linear.from_float(torch.randn(29, 70, generator=torch.Generator().manual_seed(0)))
    f32, bf16 = torch.empty(20, 96), torch.empty(20, 96, dtype=torch.bfloat16)

    cpu_kernels.ops().q4_rows_into(layer.qs, layer.d, layer.m, 9, f32)
    cpu_kernels.ops().q4_rows_into(layer.qs, layer.d, layer.m, 9, bf16)

    assert torch.equal(bf16, f32.bfloat16())


def layers() -> dict[str, torch.nn.Module]:
    w = torch.randn(OUT, 256, generator=torch.Generator().manual_seed(1))
    data = torch.from_numpy(random_blocks("Q4_K", OUT, 256, seed=4))
    return {
        "Q4_K": PackedLinear("Q4_K", 256, OUT, data),
        "int8": Int8Linear.from_float(w),  # keeps float32 tiles (below)
        "int4": Int4Linear.from_float(w),
    }


@kernels
@pytest.mark.parametrize("kind", ["Q4_K", "int4"])
def test_a_bfloat16_prompt_is_close_to_the_float32_one_and_comes_back_float32(kind, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "TILE_BYTES", 4 * 256 * 8)  # several tiles of 8 rows
    monkeypatch.setattr(cpu_kernels, "_TILES", type(cpu_kernels._TILES)())
    layer = layers()[kind]
    x = torch.randn(2, 9, 256, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(cpu_kernels, "PROMPT", "float32")
    exact = layer(x)  # float32 tiles

    monkeypatch.setattr(cpu_kernels, "PROMPT", "bfloat16")
    got = layer(x)

    assert got.dtype == torch.float32 and got.shape == exact.shape
    rel = ((got - exact).norm() / exact.norm()).item()
    assert 0 < rel < 1e-2  # rounded (so the bfloat16 path ran), to bfloat16's 8 bits
    assert torch.bfloat16 in cpu_kernels._TILES.bufs


def test_prompts_are_int16_unless_another_choice_is_asked_for(monkeypatch, caplog):
    monkeypatch.delenv("LLAMARUN_CPU_PROMPT_DTYPE", raising=False)
    assert cpu_kernels._prompt_choice() == "int16"
    for choice in ("bfloat16", "float32", "int8", " INT16 "):
        monkeypatch.setenv("LLAMARUN_CPU_PROMPT_DTYPE", choice)
        assert cpu_kernels._prompt_choice() == choice.strip().lower()
    monkeypatch.setenv("LLAMARUN_CPU_PROMPT_DTYPE", "fp8")  # not a choice: int16, with a warning
    with caplog.at_level("WARNING", logger=cpu_kernels.log.name):
        assert cpu_kernels._prompt_choice() == "int16"
    assert "LLAMARUN_CPU_PROMPT_DTYPE=fp8 is not one of" in caplog.text


@pytest.mark.parametrize(
    "flags, slower",
    [(["avx2", "amx_bf16"], False), (["avx2", "avx512_bf16"], False), (["avx2", "avx512f"], True)],
)
def test_bfloat16_prompts_warn_only_where_no_bfloat16_dot_product_is(
    monkeypatch, caplog, flags, slower
):
    monkeypatch.setenv("LLAMARUN_CPU_PROMPT_DTYPE", "bfloat16")
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: flags)
    with caplog.at_level("WARNING", logger=cpu_kernels.log.name):
        assert cpu_kernels._prompt_choice() == "bfloat16"
    assert ("slower than float32" in caplog.text) == slower


@kernels
def test_int8_prompts_keep_float32_tiles_under_bfloat16(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_TILES", type(cpu_kernels._TILES)())
    layer = layers()["int8"]
    x = torch.randn(1, 5, 256)
    monkeypatch.setattr(cpu_kernels, "PROMPT", "float32")
    exact = layer(x)

    monkeypatch.setattr(cpu_kernels, "PROMPT", "bfloat16")

    assert torch.equal(layer(x), exact)
    assert set(cpu_kernels._TILES.bufs) == {torch.float32}
