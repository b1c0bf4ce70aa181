"""Golden: GGUF files written by gguf-py from tiny random transformers models load to transformers'
numbers (F32 exactly, F16 as the fp16-rounded model, Q8_0/Q4_0 as the model with its weights
dequantized by gguf-py), and packed layers of every GGUF block type compute what gguf-py's
dequantization implies."""

from __future__ import annotations

import copy

import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

from tiny import hf_to_meta, random_blocks, tiny_hf_model, write_gguf  # noqa: E402

import llamarun  # noqa: E402
from llamarun.blocks import BLOCK_TYPES  # noqa: E402
from llamarun.config import ModelArgs, RopeScaling  # noqa: E402
from llamarun.packed import PackedLinear  # noqa: E402

PROMPT = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))


def gguf_from_hf(hf, path, qtype: str = "F32"):
    """Write a transformers model as GGUF the way llama.cpp's converter lays it out."""
    params, state = hf_to_meta(hf)
    if hf.config.tie_word_embeddings:
        del state["output.weight"]
    rope = hf.config.rope_parameters or {}
    scaling = None
    if rope.get("rope_type") == "llama3":
        scaling = RopeScaling(
            rope["factor"],
            rope["low_freq_factor"],
            rope["high_freq_factor"],
            rope["original_max_position_embeddings"],
        )
    args = ModelArgs(
        dim=params["dim"],
        n_layers=params["n_layers"],
        n_heads=params["n_heads"],
        n_kv_heads=params["n_kv_heads"],
        vocab_size=params["vocab_size"],
        hidden_dim=hf.config.intermediate_size,
        norm_eps=params["norm_eps"],
        rope_theta=params["rope_theta"],
        rope_scaling=scaling,
        max_seq_len=params["max_seq_len"],
    )
    rope_freqs = None
    if scaling is not None:
        freqs = 1.0 / args.rope_theta ** (
            torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim
        )
        rope_freqs = freqs / scaling.apply(freqs)  # what llama.cpp's converter stores
    return write_gguf(state, args, path, qtype=qtype, rope_freqs=rope_freqs)


def llamarun_logprobs(path) -> torch.Tensor:
    llm = llamarun.load(path, device="cpu", dtype="float32", max_seq_len=64)
    with torch.no_grad():
        logits = llm.model(PROMPT, torch.arange(PROMPT.shape[1])[None], all_logits=True)
    return torch.log_softmax(logits.float(), dim=-1)[0]


def hf_logprobs(hf) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(hf(PROMPT).logits.float(), dim=-1)[0]


def with_matrices(hf, transform):
    """A copy of the HF model with every 2-D weight replaced by transform(weight)."""
    out = copy.deepcopy(hf)
    with torch.no_grad():
        for p in out.parameters():
            if p.dim() == 2:
                p.copy_(transform(p))
    return out


@pytest.mark.parametrize("variant", ["gqa", "tied", "llama3"])
def test_f32_gguf_matches_transformers(tmp_path, variant):
    hf = tiny_hf_model(variant)
    path = gguf_from_hf(hf, tmp_path / "m.gguf")

    torch.testing.assert_close(llamarun_logprobs(path), hf_logprobs(hf), atol=1e-4, rtol=1e-4)


def test_f32_gguf_greedy_matches_transformers_generate(tmp_path):
    hf = tiny_hf_model("gqa")
    path = gguf_from_hf(hf, tmp_path / "m.gguf")
    with torch.no_grad():
        expected = hf.generate(PROMPT, max_new_tokens=16, min_new_tokens=16, do_sample=False)[
            0, PROMPT.shape[1] :
        ].tolist()

    llm = llamarun.load(path, device="cpu", dtype="float32", max_seq_len=64)
    got = [
        row[0]
        for row in llm.generate(
            [PROMPT[0].tolist()], llamarun.SamplingParams(temperature=0, max_new_tokens=16)
        )
    ]

    assert got == expected


def test_f16_gguf_matches_transformers_with_fp16_weights(tmp_path):
    hf = tiny_hf_model("gqa")
    path = gguf_from_hf(hf, tmp_path / "m.gguf", qtype="F16")

    rounded = with_matrices(hf, lambda w: w.half().float())

    torch.testing.assert_close(llamarun_logprobs(path), hf_logprobs(rounded), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_quantized_gguf_matches_transformers_with_gguf_dequantized_weights(tmp_path, qtype):
    # Blocks run along rows, so quantizing commutes with hf_to_meta's q/k row permutation.
    kind = gguf.GGMLQuantizationType[qtype]
    hf = tiny_hf_model("gqa")
    path = gguf_from_hf(hf, tmp_path / "m.gguf", qtype=qtype)
    reference = with_matrices(
        hf,
        lambda w: torch.from_numpy(
            gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), kind), kind).copy()
        ),
    )

    ckpt = llamarun.loaders.gguf.load(path, keep_quantized=False)
    model = llamarun.build_model(ckpt, torch.device("cpu"), torch.float32)
    model.setup_caches(1, 64, torch.float32)
    with torch.no_grad():
        got = torch.log_softmax(
            model(PROMPT, torch.arange(PROMPT.shape[1])[None], all_logits=True), dim=-1
        )[0]

    torch.testing.assert_close(got, hf_logprobs(reference), atol=1e-4, rtol=1e-4)


# gguf_blocks.h's byte-form types (BYTES8): Q2_K only where the kernels have VNNI
EIGHT_BIT_LEVELS = {"Q2_K", "Q3_K", "Q5_K", "Q6_K"}


@pytest.mark.parametrize("qtype", BLOCK_TYPES)
def test_packed_layer_equals_gguf_dequantization_on_random_blocks(qtype):
    kind = gguf.GGMLQuantizationType[qtype]
    blocks = random_blocks(qtype, 96, 512)
    weight = torch.from_numpy(gguf.quants.dequantize(blocks, kind).copy())
    # activations the kernels quantize without error, so any difference comes from the weights:
    # per block of 32 they take 16 bits (x = d * X, d = max|x| / 32767): integers with 32767 in
    # every block; or for the types unpacked to bytes, two 8-bit levels (x = d1 * q1 + d1 / 256 *
    # q2, d1 = max|x| / 127 per 32 with VNNI, per 256 on AVX2, |q2| <= 127): integers with 127 *
    # 256 in every block of 32 and none 128 away from a multiple of 256
    top = 127 * 256 if qtype in EIGHT_BIT_LEVELS else 32767
    x = torch.randint(-top, top + 1, (3, 512), generator=torch.Generator().manual_seed(0))
    if qtype in EIGHT_BIT_LEVELS:
        x = torch.where(x % 256 == 128, x + 1, x)
    x = x.float()
    x[:, ::32] = top

    layer = PackedLinear(qtype, 512, 96, torch.from_numpy(blocks))

    expected = (x.double() @ weight.double().T).float()
    torch.testing.assert_close(
        layer(x), expected, atol=1e-5 * expected.abs().max().item(), rtol=1e-5
    )
