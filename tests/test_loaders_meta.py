"""Meta checkpoint folders: shards merged in one process, params.json read, bad folders explained."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import llamarun_state, meta_params, write_meta
from tiny_tokenizers import write_sentencepiece

from llamarun.config import RopeScaling
from llamarun.errors import CheckpointError
from llamarun.loaders import load_checkpoint
from llamarun.loaders.meta import load


@pytest.fixture
def state(tiny_model) -> dict[str, torch.Tensor]:
    return llamarun_state(tiny_model)


@pytest.fixture
def params(tiny_args) -> dict:
    return meta_params(tiny_args)


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_any_number_of_shards_merges_to_the_original_weights(
    state, params, tiny_args, tmp_path, shards
):
    path = write_meta(state, params, tmp_path / "m", shards=shards)

    ckpt = load(path)

    assert ckpt.format == "meta" and ckpt.dtype == torch.float32
    assert ckpt.args == tiny_args.__class__(**{**tiny_args.__dict__, "max_seq_len": 4096})
    assert ckpt.weights.keys() == state.keys()
    for name, t in state.items():
        torch.testing.assert_close(ckpt.weights[name], t, atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("shards", [2, 4])
def test_llama3_vocab_parallel_embedding_shards(state, params, tmp_path, shards):
    path = write_meta(state, params, tmp_path / "m", shards=shards, vocab_parallel=True)

    ckpt = load(path)

    assert ckpt.args.vocab_size == 320
    torch.testing.assert_close(
        ckpt.weights["tok_embeddings.weight"], state["tok_embeddings.weight"], atol=0, rtol=0
    )


def test_vocab_size_minus_one_comes_from_the_embedding(state, params, tmp_path):
    assert params["vocab_size"] == -1  # Llama 2 style
    ckpt = load(write_meta(state, params, tmp_path / "m"))

    assert ckpt.args.vocab_size == 320 and ckpt.args.hidden_dim == 128


def test_rope_freqs_is_dropped_and_dtype_is_what_the_file_stores(state, params, tmp_path):
    stored = {k: v.to(torch.bfloat16) for k, v in state.items()} | {"rope.freqs": torch.ones(8)}
    ckpt = load(write_meta(stored, params, tmp_path / "m"))

    assert "rope.freqs" not in ckpt.weights
    assert ckpt.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("extra", "scaling", "max_seq_len"),
    [
        ({}, None, 4096),  # Llama 2
        ({"rope_theta": 500000.0}, None, 8192),  # Llama 3
        ({"rope_theta": 500000.0, "use_scaled_rope": True}, RopeScaling(), 131072),  # Llama 3.1
        ({"use_scaled_rope": True, "rope_scaling_factor": 32.0}, RopeScaling(factor=32.0), 131072),
        ({"max_seq_len": 2048}, None, 2048),
    ],
)
def test_params_json_rope_and_context(state, params, tmp_path, extra, scaling, max_seq_len):
    ckpt = load(write_meta(state, params | extra, tmp_path / "m"))

    assert ckpt.args.rope_scaling == scaling
    assert ckpt.args.max_seq_len == max_seq_len
    assert ckpt.args.rope_theta == extra.get("rope_theta", 10000.0)


def test_tokenizer_found_beside_the_shards_or_one_folder_up(state, params, tmp_path):
    up_path = write_meta(state, params, tmp_path / "up" / "llama-2-7b")
    write_sentencepiece(up_path.parent)  # Meta's download: tokenizer.model next to llama-2-7b/
    up = load(up_path)
    beside_path = write_meta(state, params, tmp_path / "beside" / "m")
    write_sentencepiece(beside_path)
    none = load(write_meta(state, params, tmp_path / "none" / "m"))

    assert up.tokenizer is not None and up.tokenizer.vocab_size == 300
    assert load(beside_path).tokenizer is not None
    assert none.tokenizer is None


def _error(path) -> str:
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    return str(e.value)


def test_missing_middle_shard_is_named(state, params, tmp_path):
    path = write_meta(state, params, tmp_path / "m", shards=4)
    (path / "consolidated.01.pth").unlink()

    message = _error(path)

    assert "consolidated.01.pth" in message and str(path) in message and "Download" in message


def test_missing_last_shard_is_inferred_from_the_shapes(state, params, tmp_path):
    path = write_meta(state, params, tmp_path / "m", shards=2)
    (path / "consolidated.01.pth").unlink()

    message = _error(path)

    assert "consolidated.01.pth" in message and str(path) in message and "missing" in message


def test_missing_tensor_is_named(state, params, tmp_path):
    del state["layers.1.feed_forward.w3.weight"]
    path = write_meta(state, params, tmp_path / "m", shards=2)

    message = _error(path)

    assert (
        "layers.1.feed_forward.w3.weight" in message
        and str(path) in message
        and "incomplete" in message
    )


def test_shape_disagreeing_with_params_is_named(state, params, tmp_path):
    path = write_meta(state, params | {"n_kv_heads": 4}, tmp_path / "m")

    message = _error(path)

    assert (
        "layers.0.attention.wk.weight" in message
        and "(32, 64)" in message
        and "(64, 64)" in message
    )
    assert str(path) in message and "different model" in message


def test_hidden_dim_disagreeing_with_multiple_of_is_named(state, params, tmp_path):
    path = write_meta(
        state, params | {"multiple_of": 256, "ffn_dim_multiplier": None}, tmp_path / "m"
    )

    message = _error(path)

    assert "hidden size 128" in message and "implies 256" in message and "params.json" in message


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_shard_is_one_sentence_naming_the_file(state, params, tmp_path, damage):
    path = write_meta(state, params, tmp_path / "m", shards=2)
    shard = path / "consolidated.01.pth"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 100)

    message = _error(path)

    assert str(shard) in message and "download it again" in message


def test_shards_from_different_checkpoints(state, params, tmp_path):
    path = write_meta(state, params, tmp_path / "m", shards=2)
    other = {k: v for k, v in state.items() if k != "norm.weight"}
    write_meta(other, params, tmp_path / "other", shards=2)
    (tmp_path / "other" / "consolidated.01.pth").replace(path / "consolidated.01.pth")

    message = _error(path)

    assert "consolidated.01.pth" in message and "norm.weight" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"n_layers": 2, "n_heads": 4}), "'dim'"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_invalid_params_json(state, params, tmp_path, text, expected):
    path = write_meta(state, params, tmp_path / "m")
    (path / "params.json").write_text(text)

    message = _error(path)

    assert (
        str(path / "params.json") in message
        and expected in message
        and "restore" in message.lower()
    )


def test_folder_without_checkpoint_lists_what_was_looked_for(tmp_path):
    (tmp_path / "params.json").write_text("{}")

    message = _error(tmp_path)

    assert str(tmp_path) in message and "consolidated.*.pth" in message and "config.json" in message
