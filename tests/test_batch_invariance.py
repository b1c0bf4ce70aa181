"""A row's result does not depend on its batch: each product's rows (float32, int8, int4 and every
GGUF block type), the one-call decode step's and the eager forward's logits are bit for bit the
same alone and beside other rows at other positions, and so are a greedy request's tokens."""

from __future__ import annotations

import pytest
import torch
from test_cpu_step import GQA, packed_model, random_model

from llamarun import cpu_kernels
from llamarun.blocks import BLOCK_TYPES
from llamarun.build import prepare
from llamarun.cpu import CpuStep
from llamarun.engine import Engine
from llamarun.sampling import SamplingParams

pytestmark = pytest.mark.skipif(
    cpu_kernels.ops() is None, reason="no CPU kernels here (needs x86 AVX2 and a C++ compiler)"
)

SIZES = torch.logspace(-2, 2, 9)[:, None]  # rows of very different sizes


def layers() -> dict[str, torch.nn.Module]:
    """One layer of each kind the kernels run, 200 inputs (not a multiple of 32 for int8/int4)."""
    from test_packed import OUT, width
    from tiny import random_blocks

    from llamarun.cpu import CpuLinear
    from llamarun.packed import PackedLinear
    from llamarun.quantize import Int4Linear, Int8Linear

    torch.manual_seed(0)
    weight = torch.randn(OUT, 200)
    f32 = CpuLinear(200, OUT, bias=False)
    f32.weight.data = weight
    kinds = {
        "f32": f32,
        "int8": Int8Linear.from_float(weight),
        "int4": Int4Linear.from_float(weight),
    }
    for qtype in BLOCK_TYPES:
        data = torch.from_numpy(random_blocks(qtype, OUT, width(qtype)))
        kinds[qtype] = PackedLinear(qtype, width(qtype), OUT, data)
    return kinds


@pytest.mark.parametrize("kind", ["f32", "int8", "int4", *BLOCK_TYPES])
def test_each_product_row_is_the_same_alone_in_a_batch_and_anywhere_in_it(kind):
    layer = layers()[kind]
    x = torch.randn(9, layer.in_features) * SIZES

    batch = layer(x)

    for i in range(9):
        assert torch.equal(layer(x[i : i + 1]), batch[i : i + 1]), f"row {i}"
    order = torch.tensor([4, 8, 0, 2, 7, 1, 6, 3, 5])
    assert torch.equal(layer(x[order]), batch[order])
    for n in (2, 3, 5):  # the tile sizes of the kernels' loops
        assert torch.equal(layer(x[:n]), batch[:n])


# hidden_dim 172 (stories260K's), not a multiple of 8, 16 or 32: torch's element-wise loops run a
# flattened tensor's last numel % 32 values (AVX-512; % 16 on AVX2) through other code than its body,
# so an eager SwiGLU through torch would tie a row's result to its batch; cpu_kernels.silu_mul
# computes each row alone
ARGS = GQA
MODELS = {  # a name per kind of model, and how to make it with 8 cache rows
    "float32": lambda: random_model(ARGS, None, False, batch=8),
    "int8": lambda: random_model(ARGS, "int8", False, batch=8),
    "int4": lambda: random_model(ARGS, "int4", True, batch=8),
    "Q4_K_M-like": lambda: packed_model(["Q4_K", "Q6_K", "Q5_0", "Q8_0"], tied=True, batch=8),
    "other blocks": lambda: packed_model(
        ["Q2_K", "Q3_K", "Q5_K", "IQ4_XS", "Q4_0", "Q4_1", "Q5_1", "IQ4_NL"], tied=False, batch=8
    ),
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("eager", [False, True], ids=["one-call step", "eager forward"])
@torch.inference_mode()
def test_decode_logits_of_a_row_are_the_same_alone_and_among_seven_others(name, eager):
    model = MODELS[name]()
    vocab = model.args.vocab_size
    step = model if eager else CpuStep.build(model)
    assert step is not None
    lengths = [5, 1, 12, 3, 9, 2, 7, 4]  # each row at its own position
    for row, n in enumerate(lengths):
        model(torch.randint(0, vocab, (1, n)), torch.arange(n)[None], torch.tensor([row]))
    tokens = torch.randint(0, vocab, (8, 1))
    input_pos = torch.tensor(lengths)[:, None]

    batch = step(tokens, input_pos, torch.arange(8))

    for row in range(8):  # the cache is rewritten with the same values each time
        alone = step(tokens[row : row + 1], input_pos[row : row + 1], torch.tensor([row]))
        assert torch.equal(alone[0], batch[row]), f"row {row}"


@pytest.mark.parametrize("name", ["float32", "Q4_K_M-like"])
def test_a_greedy_request_decodes_the_same_tokens_alone_and_beside_seven_others(name):
    model = MODELS[name]()
    llm = prepare(model, None)
    greedy = SamplingParams(temperature=0, max_new_tokens=10)
    request = [3, 1, 4, 1, 5]

    def run(others: bool) -> list[int]:
        engine = Engine(model, frozenset(), decode=llm.engine._decode)
        got = [engine.add(2, request, greedy).token_id]
        if others:
            for slot in (0, 1, 3, 4, 5, 6, 7):  # longer and shorter prompts, other positions
                engine.add(slot, list(range(1, 2 + 2 * slot)), SamplingParams(temperature=0))
        while engine.slots[2].finish_reason is None:
            got += [out.token_id for out in engine.step() if out.slot == 2]
        return got

    assert run(others=True) == run(others=False)


def test_amx_tiles_are_opt_in():
    from llamarun.quantize import Int8Linear

    model = MODELS["int8"]()

    default = prepare(model, None)
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert layers and not any(m.amx for m in layers) and not default.engine._decode.amx
    asked = prepare(model, None, amx=True)  # faster batches on AMX, not batch-invariant
    assert all(m.amx for m in layers) and asked.engine._decode.amx


def test_silu_mul_matches_torch_row_by_row_on_fused_halves_and_keeps_autograd():
    torch.manual_seed(0)
    gate_up = torch.randn(2, 9, 2 * 172) * 4  # the two halves of a fused w13 product: strided rows
    gate, up = gate_up.chunk(2, dim=-1)

    y = cpu_kernels.silu_mul(gate, up)

    torch.testing.assert_close(y, torch.nn.functional.silu(gate) * up, rtol=1e-6, atol=1e-6)
    for i in range(9):  # any row alone, from a contiguous copy, is the same bits
        assert torch.equal(cpu_kernels.silu_mul(gate[1, i].clone(), up[1, i].clone()), y[1, i])
    x = gate.clone().requires_grad_()
    cpu_kernels.silu_mul(x, up).sum().backward()  # torch's ops where autograd records
    assert x.grad is not None and torch.isfinite(x.grad).all()
