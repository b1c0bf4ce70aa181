"""CpuStep (the whole decode step in one C++ call) against the model's eager forward."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llamarun import cpu_kernels
from llamarun.build import prepare
from llamarun.config import ModelArgs
from llamarun.cpu import CpuStep, argmax_ids, use_cpu_kernels_
from llamarun.model import Transformer
from llamarun.offload import place_
from llamarun.quantize import fuse_, quantize_
from llamarun.sampling import SamplingParams

pytestmark = pytest.mark.skipif(
    cpu_kernels.ops() is None, reason="no CPU kernels here (needs x86 AVX2 and a C++ compiler)"
)

GQA = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=97, hidden_dim=172)
MHA_TIED = ModelArgs(
    dim=96, n_layers=2, n_heads=3, n_kv_heads=3, vocab_size=80, hidden_dim=256, tie_embeddings=True
)


def random_model(args: ModelArgs, mode: str | None, fused: bool, batch: int = 3) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(args).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    if mode:
        quantize_(model, mode)
    if fused:
        fuse_(model)
    use_cpu_kernels_(model)
    model.setup_caches(batch, 48)
    return model


def caches(model: Transformer) -> list[torch.Tensor]:
    return [
        t.clone() for b in model.layers for t in (b.attention.kv_cache.k, b.attention.kv_cache.v)
    ]


def restore(model: Transformer, saved: list[torch.Tensor]) -> None:
    live = [t for b in model.layers for t in (b.attention.kv_cache.k, b.attention.kv_cache.v)]
    for t, s in zip(live, saved):
        t.copy_(s)


@pytest.mark.parametrize("args", [GQA, MHA_TIED], ids=["gqa", "mha-tied"])
@pytest.mark.parametrize("mode", [None, "int8", "int4"])
@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
@torch.inference_mode()
def test_step_matches_eager_forward_for_rows_at_different_positions(args, mode, fused):
    model = random_model(args, mode, fused)
    step = CpuStep.build(model)
    assert step is not None
    rows = torch.tensor([2, 0])  # cache rows out of order, row 1 idle
    for row, length in zip(rows.tolist(), (7, 3)):
        prompt = torch.randint(0, args.vocab_size, (1, length))
        model(prompt, torch.arange(length)[None], torch.tensor([row]))
    tokens = torch.tensor([[5], [9]])
    input_pos = torch.tensor([[7], [3]])
    before = caches(model)
    # Act
    expected = model(tokens, input_pos, rows)
    expected_caches = caches(model)
    restore(model, before)
    got = step(tokens, input_pos, rows)
    # Assert: same logits to float rounding, and the same keys/values written to the cache
    assert got.shape == expected.shape == (2, args.vocab_size)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    for g, e in zip(caches(model), expected_caches):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", [None, "int8"])
@torch.inference_mode()
def test_step_with_a_float16_cache_matches_eager_forward(mode):
    model = random_model(GQA, mode, fused=False)
    model.setup_caches(3, 48, torch.float16)  # --kv-cache-dtype float16 under a float32 model
    step = CpuStep.build(model)
    assert step is not None
    rows = torch.tensor([1, 2])
    for row, length in zip(rows.tolist(), (5, 9)):
        model(
            torch.randint(0, GQA.vocab_size, (1, length)),
            torch.arange(length)[None],
            rows[[row - 1]],
        )
    tokens, input_pos = torch.tensor([[5], [9]]), torch.tensor([[5], [9]])
    before = caches(model)
    # Act
    expected = model(tokens, input_pos, rows)
    expected_caches = caches(model)
    restore(model, before)
    got = step(tokens, input_pos, rows)
    # Assert: the same float16 keys/values written, the same logits to float rounding
    assert all(c.dtype == torch.float16 for c in caches(model))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    for g, e in zip(caches(model), expected_caches):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_engine_decodes_through_the_step_with_the_same_tokens_as_eager():
    model = random_model(GQA, "int8", fused=False, batch=2)
    prompts = [[1, 2, 3, 4], [7, 8]]
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    fast = prepare(model, None)
    assert isinstance(fast.engine._decode, CpuStep)
    # Act
    got = list(fast.generate(prompts, params))
    fast.engine._decode = model  # the eager forward, same weights and cache
    expected = list(fast.generate(prompts, params))
    # Assert
    assert got == expected


def test_models_it_cannot_run_keep_the_eager_forward():
    bf16 = random_model(GQA, None, fused=False).to(torch.bfloat16)
    offloaded = random_model(GQA, None, fused=False)
    place_(offloaded, torch.device("cpu"), torch.float32, n_offload=1)
    odd = random_model(GQA, None, fused=False)
    odd.args = dataclasses.replace(GQA, n_kv_heads=2)  # the Decoder's own shape checks refuse it
    # Act / Assert
    assert CpuStep.build(bf16) is None
    assert CpuStep.build(offloaded) is None
    assert CpuStep.build(odd) is None
    assert not isinstance(prepare(bf16, None).engine._decode, CpuStep)


@torch.inference_mode()
def test_step_follows_caches_set_up_again():
    model = random_model(GQA, "int4", fused=False)
    step = CpuStep.build(model)
    model.setup_caches(2, 16)  # new cache tensors; the old decoder would write to freed ones
    model(torch.tensor([[3, 4]]), torch.tensor([[0, 1]]))
    tokens, input_pos = torch.tensor([[6]]), torch.tensor([[2]])
    before = caches(model)
    # Act
    expected = model(tokens, input_pos)
    restore(model, before)
    got = step(tokens, input_pos)
    # Assert
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_argmax_ids_matches_torch_including_ties_and_odd_widths():
    torch.manual_seed(0)
    logits = torch.randn(3, 1003)
    logits[1, 17] = logits[1, 900] = 50.0  # a tie: the first index wins, as in torch
    logits[2, 1002] = 60.0  # in the tail past the last full vector
    # Act
    got = argmax_ids(logits)
    # Assert
    assert got == logits.argmax(dim=-1).tolist() == [got[0], 17, 1002]


@torch.inference_mode()
def test_step_follows_a_model_quantized_after_it_was_built():
    model = random_model(GQA, None, fused=False)
    step = CpuStep.build(model)
    tokens, input_pos, rows = torch.tensor([[5]]), torch.tensor([[0]]), torch.tensor([0])
    float_logits = step(tokens, input_pos, rows)  # the step has run on the float32 weights
    quantize_(model, "int4")  # Act: the model changes under the step
    got = step(tokens, input_pos, rows)
    expected = model(tokens, input_pos, rows)
    # Assert: the step decoded with the new weights, not the ones it was built over
    assert not torch.allclose(float_logits, expected, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def packed_model(qtypes: list[str], tied: bool, batch: int = 3) -> Transformer:
    """A model whose matrices (embedding included) are PackedLinear / PackedEmbedding over random
    GGUF blocks of `qtypes`, in turn, as build.py makes them from a file."""
    from tiny import random_blocks

    from llamarun.packed import PackedEmbedding, PackedLinear

    args = ModelArgs(
        dim=256,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=70,
        hidden_dim=512,
        tie_embeddings=tied,
    )
    torch.manual_seed(0)
    model = Transformer(args).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, mean=1.0, std=0.1)  # the norms; the matrices are replaced
    linears = [
        (m, n, c)
        for m in model.modules()
        for n, c in m.named_children()
        if isinstance(c, torch.nn.Linear)
    ]
    for i, (module, name, child) in enumerate(linears):
        qtype = qtypes[i % len(qtypes)]
        data = torch.from_numpy(
            random_blocks(qtype, child.out_features, child.in_features, seed=i, scale=0.003)
        )
        setattr(module, name, PackedLinear(qtype, child.in_features, child.out_features, data))
    data = torch.from_numpy(
        random_blocks(qtypes[0], args.vocab_size, args.dim, seed=99, scale=0.02)
    )
    model.tok_embeddings = PackedEmbedding(qtypes[0], args.vocab_size, args.dim, data)
    if tied:
        model.output = model.tok_embeddings.tied_linear()
    model.setup_caches(batch, 48)
    return model


@pytest.mark.parametrize(
    "qtypes, tied",
    [
        (["Q4_K", "Q6_K"], True),
        (["Q5_0", "Q8_0", "Q4_1"], False),
        (["Q2_K", "Q3_K", "Q5_K", "IQ4_XS"], True),
        (["Q4_0", "Q5_1", "IQ4_NL"], False),
    ],
)
@torch.inference_mode()
def test_step_runs_gguf_blocks_and_packed_embeddings_like_eager_forward(qtypes, tied):
    model = packed_model(qtypes, tied)
    step = CpuStep.build(model)
    assert step is not None  # the whole step in C++, the GGUF linears and embedding included
    rows = torch.tensor([2, 0])
    for row, length in zip(rows.tolist(), (6, 2)):
        model(torch.randint(0, 70, (1, length)), torch.arange(length)[None], torch.tensor([row]))
    tokens, input_pos = torch.tensor([[5], [69]]), torch.tensor([[6], [2]])
    before = caches(model)

    expected = model(tokens, input_pos, rows)
    restore(model, before)
    got = step(tokens, input_pos, rows)

    # looser than float steps: the C++ norms and attention round differently from torch's, which
    # moves an activation across a 16-bit quantization step here and there
    assert got.shape == expected.shape
    assert ((got - expected).norm() / expected.norm()).item() < 1e-3
