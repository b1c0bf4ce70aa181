"""The network alone: cached decoding equals a full forward, batch rows are independent, the
Llama 3.1 rope scaling equals transformers', and fuse_() changes no numbers."""

from __future__ import annotations

import pytest
import torch

from llamarun.config import ModelArgs, RopeScaling
from llamarun.model import Transformer
from llamarun.quantize import fuse_


def _positions(start: int, stop: int) -> torch.Tensor:
    return torch.arange(start, stop)[None]  # (1, T)


@torch.no_grad()
def test_prefill_then_decode_equals_full_forward(tiny_model):
    tiny_model.setup_caches(1, 64)
    tokens = torch.randint(
        0, tiny_model.args.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0)
    )
    full = tiny_model(tokens, _positions(0, 20), all_logits=True)[0]  # (T, V)

    tiny_model.setup_caches(1, 64)  # fresh cache
    stepped = [tiny_model(tokens[:, :17], _positions(0, 17))[0]]
    for pos in range(17, 20):
        stepped.append(tiny_model(tokens[:, pos : pos + 1], _positions(pos, pos + 1))[0])

    torch.testing.assert_close(torch.stack(stepped), full[16:], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def _greedy(model: Transformer, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Prefill each prompt into its own cache row, then decode all rows together."""
    rows = torch.arange(len(prompts))
    last = []
    for i, prompt in enumerate(prompts):
        logits = model(torch.tensor([prompt]), _positions(0, len(prompt)), rows[i : i + 1])
        last.append(int(logits.argmax(-1)))
    out = [[t] for t in last]
    pos = torch.tensor([[len(p)] for p in prompts])  # (B, 1): each row at its own position
    for _ in range(steps - 1):
        logits = model(torch.tensor(last)[:, None], pos, rows)  # (B, V)
        last = logits.argmax(-1).tolist()
        for row, t in zip(out, last):
            row.append(t)
        pos = pos + 1
    return out


def test_batch_of_different_lengths_equals_each_alone(tiny_model):
    prompts = [[5, 17, 99, 3], [42, 8, 8, 200, 7, 61, 13, 2, 150], [77]]
    tiny_model.setup_caches(len(prompts), 64)
    batched = _greedy(tiny_model, prompts, steps=12)

    alone = []
    for prompt in prompts:
        tiny_model.setup_caches(1, 64)
        alone.append(_greedy(tiny_model, [prompt], steps=12)[0])

    assert batched == alone


@torch.no_grad()
def test_batched_prefill_equals_each_row_alone(tiny_model):
    tokens = torch.randint(
        0, tiny_model.args.vocab_size, (3, 10), generator=torch.Generator().manual_seed(1)
    )
    tiny_model.setup_caches(3, 32)
    batched = tiny_model(tokens, _positions(0, 10).expand(3, -1), all_logits=True)  # (B, T, V)

    for b in range(3):
        tiny_model.setup_caches(1, 32)
        alone = tiny_model(tokens[b : b + 1], _positions(0, 10), all_logits=True)
        torch.testing.assert_close(batched[b : b + 1], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("factor", "original", "theta", "head_dim"),
    [(8.0, 8192, 500000.0, 128), (32.0, 8192, 500000.0, 64), (8.0, 32, 10000.0, 16)],
)
def test_rope_scaling_matches_transformers_llama3(factor, original, theta, head_dim):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {
        "rope_type": "llama3",
        "rope_theta": theta,
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": original,
    }
    config = transformers.LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        max_position_embeddings=original * 16,
        rope_parameters=rope,
    )
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")

    base = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    scaled = RopeScaling(factor=factor, original_max_seq_len=original).apply(base)

    assert not torch.allclose(scaled, base)  # the case exercises the scaling
    torch.testing.assert_close(scaled, expected.float(), atol=0, rtol=1e-6)


@torch.no_grad()
def test_fuse_keeps_logits(tiny_model):
    tokens = torch.randint(
        0, tiny_model.args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2)
    )
    tiny_model.setup_caches(2, 32)
    before = tiny_model(tokens, _positions(0, 9).expand(2, -1), all_logits=True)

    fuse_(tiny_model)
    tiny_model.setup_caches(2, 32)
    after = tiny_model(tokens, _positions(0, 9).expand(2, -1), all_logits=True)

    assert tiny_model.layers[0].attention.wqkv is not None and not hasattr(
        tiny_model.layers[0].attention, "wq"
    )
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_tied_embeddings_share_one_tensor():
    args = ModelArgs(
        dim=32, n_layers=1, n_heads=4, vocab_size=64, hidden_dim=64, tie_embeddings=True
    )
    model = Transformer(args)

    assert model.output.weight is model.tok_embeddings.weight


def test_the_kv_cache_returns_only_the_slots_a_forward_can_attend():
    from llamarun.cache import KVCache

    cache = KVCache(3, 16, 2, 4, torch.float32)
    assert cache.k.abs().sum() == 0 and cache.v.abs().sum() == 0  # unwritten slots read as zeros
    k, v = torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4)  # (B, T, Hkv, D) at positions 3, 4
    pos = torch.tensor([[3, 4]])

    keys, values = cache.update(torch.tensor([1]), pos, k, v, length=5)

    assert keys.shape == values.shape == (1, 2, 5, 4)
    assert torch.equal(keys[0, :, 3:5], k[0].transpose(0, 1)) and keys[:, :, :3].abs().sum() == 0
    assert keys.data_ptr() == cache.k[1].data_ptr()  # one row: a view of the cache, not a copy
    both, _ = cache.update(
        torch.tensor([2, 1]), pos.expand(2, 2), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), 5
    )
    assert both.shape == (2, 2, 5, 4) and torch.equal(both[1], keys[0])  # several: a gather of 5
    full, _ = cache.update(None, pos, k, v)
    assert full.shape == (1, 2, 16, 4)  # no length: every slot (a compiled step's static shape)
