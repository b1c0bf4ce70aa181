"""GGUF blocks transcoded to the layouts GPU kernels take (int4 groups of 32 for torch's
_weight_int4pack_mm, int8 with group scales), checked on CPU: the transcoded tensors dequantize
to what gguf-py dequantizes, and the memory plan counts them."""

from __future__ import annotations

import pytest
import torch

gguf = pytest.importorskip("gguf")

from test_packed import OUT, reference, width  # noqa: E402
from tiny import random_blocks  # noqa: E402

from llamarun.blocks import BLOCK_TYPES  # noqa: E402
from llamarun.config import KNOWN_MODELS  # noqa: E402
from llamarun.packed import PackedLinear  # noqa: E402
from llamarun.plan import GB, plan_memory  # noqa: E402
from llamarun.transcode import (  # noqa: E402
    INT4_TYPES,
    GroupedInt8Linear,
    int4_values,
    int8_values,
    transcode_,
    transcoded_bytes,
)
from llamarun.weights import StoredTensor, expected_shapes  # noqa: E402


def packed(qtype: str, rows: int = OUT) -> tuple[PackedLinear, torch.Tensor]:
    data = random_blocks(qtype, rows, width(qtype))
    return PackedLinear(qtype, width(qtype), rows, torch.from_numpy(data)), reference(data, qtype)


@pytest.mark.parametrize("qtype", INT4_TYPES)
def test_int4_values_are_the_files_4_bit_values_and_scales(qtype):
    layer, expected = packed(qtype)

    q, scale, zero = int4_values(layer)

    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and q.shape == expected.shape
    w = q.float().view(OUT, -1, 32) * scale[..., None] + zero[..., None]
    assert torch.equal(w.view(OUT, -1), expected)  # exact in float32: only bf16 would round


@pytest.mark.parametrize("qtype", BLOCK_TYPES)
def test_int8_groups_dequantize_to_gguf_py(qtype):
    layer, expected = packed(qtype)

    q, scale, zero, group = int8_values(layer)
    got = GroupedInt8Linear(q, scale, zero, group)

    assert q.dtype == torch.int8 and group in (16, 32)
    # exact but where the 4-bit types move their zero to q = 8 (one more float rounding)
    tolerance = 1e-6 if qtype in INT4_TYPES else 0.0
    torch.testing.assert_close(got.dequantize(), expected, rtol=tolerance, atol=tolerance)
    x = torch.randn(3, width(qtype))
    torch.testing.assert_close(got(x), x @ expected.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qtype", INT4_TYPES)
def test_int4_scales_and_zeros_in_torchs_int4_kernel_layout(qtype):
    # the CPU twin of the CUDA kernel takes the same (groups, out, 2) bfloat16 scale/zero pairs
    # with w = (q - 8) * scale + zero; rows a multiple of 16 for its packing
    layer, expected = packed(qtype, rows=48)
    q, scale, zero = int4_values(layer)
    pairs = torch.stack([scale, zero + 8 * scale], -1).transpose(0, 1).contiguous().bfloat16()
    packed_q = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
    x = torch.randn(5, layer.in_features).bfloat16()

    got = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed_q, 32, pairs)

    want = x.float() @ expected.T
    assert ((got.float() - want).norm() / want.norm()).item() < 1e-2  # bfloat16 scales and output


def test_layers_on_the_cpu_keep_their_blocks():
    layer, _ = packed("Q4_K")
    model = torch.nn.Sequential(layer)

    transcode_(model, torch.bfloat16)

    assert model[0] is layer


def test_bytes_of_each_gpu_layout():
    # int4: half a byte per weight and a bfloat16 scale and zero per 32
    assert transcoded_bytes("Q4_K", (4096, 4096), torch.bfloat16) == 4096 * 2048 + 4096 * 128 * 4
    # int8 with a float32 scale per 16 (Q6_K) or per 32 and a zero (Q5_K)
    assert transcoded_bytes("Q6_K", (4096, 4096), torch.bfloat16) == 4096 * 4096 + 4096 * 256 * 4
    assert transcoded_bytes("Q5_K", (4096, 4096), torch.bfloat16) == 4096 * 4096 + 4096 * 128 * 8
    # rows padded to a multiple of 1024 for torch's kernel
    assert transcoded_bytes("Q4_K", (576, 1536), torch.bfloat16) == 576 * 1024 + 576 * 64 * 4
    # not bfloat16: the 4-bit types take int8 with a scale and zero per 32
    assert transcoded_bytes("Q4_K", (576, 1536), torch.float16) == 576 * 1536 + 576 * 48 * 8


def llama_2_7b_q4_k_m() -> dict[str, StoredTensor]:
    """Llama-2-7B's tensors as llama.cpp's Q4_K_M recipe stores them: Q6_K for the classifier and
    for attn_v / ffn_down in about half the layers, Q4_K for the other matrices, F32 norms."""
    sizes = {"Q4_K": (256, 144), "Q6_K": (256, 210), "F32": (1, 4)}
    tensors = {}
    for name, shape in expected_shapes(KNOWN_MODELS["llama-2-7b"]).items():
        layer = int(name.split(".")[1]) if name.startswith("layers.") else 0
        more_bits = name.endswith(("wv.weight", "w2.weight")) and layer % 2 == 0
        qtype = (
            "F32" if len(shape) == 1 else "Q6_K" if more_bits or name == "output.weight" else "Q4_K"
        )
        block, size = sizes[qtype]
        n_bytes = torch.Size(shape).numel() // block * size
        tensors[name] = StoredTensor(qtype, shape, n_bytes, packed=qtype != "F32")
    return tensors


def test_a_llama_2_7b_q4_k_m_fits_a_12_gb_gpu_with_room():
    stored = llama_2_7b_q4_k_m()
    args = KNOWN_MODELS["llama-2-7b"]
    file_bytes = sum(t.n_bytes for t in stored.values())

    plan = plan_memory(
        args,
        device="cuda",
        dtype=torch.bfloat16,
        seq_len=4096,
        free=12 * GB,
        free_cpu=16 * GB,
        stored=stored,
    )

    assert 3.8 * GB < file_bytes < 4.2 * GB  # the size of the files people download
    assert plan.fits and plan.chosen.offload_layers == 0
    assert plan.asked.weights < 1.25 * file_bytes  # int4 as stored, Q6_K as int8
    assert plan.asked.total < 9 * GB  # with a 4096-token float cache and working memory


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("qtype", ["Q4_K", "Q4_0", "Q6_K", "Q5_K"])
def test_on_a_gpu_packed_layers_run_in_their_gpu_layout(qtype):
    layer, expected = packed(qtype, rows=64)
    model = torch.nn.Sequential(layer).to("cuda")

    transcode_(model, torch.bfloat16)

    x = torch.randn(3, layer.in_features, device="cuda", dtype=torch.bfloat16)
    want = x.float() @ expected.cuda().T
    got = model(x).float()
    assert type(model[0]).__name__ == (
        "Int4PackLinear" if qtype in INT4_TYPES else "GroupedInt8Linear"
    )
    assert ((got - want).norm() / want.norm()).item() < 1e-2  # bfloat16 activations and scales
