"""Hugging Face folders: safetensors (single, sharded + index), pytorch_model.bin, config.json in
both rope styles, tokenizer stop ids and chat templates, and each bad folder explained."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from tiny import hf_config, llamarun_state, meta_to_hf, write_hf_state
from tiny_tokenizers import write_hf_tokenizer

from llamarun.config import RopeScaling
from llamarun.errors import CheckpointError
from llamarun.loaders import load_checkpoint
from llamarun.loaders.hf import load

LLAMA3 = RopeScaling(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192
)


@pytest.fixture
def state(tiny_model) -> dict[str, torch.Tensor]:
    return llamarun_state(tiny_model)


@pytest.fixture
def hf_state(state, tiny_args) -> dict[str, torch.Tensor]:
    return meta_to_hf(state, tiny_args)


def _assert_same_weights(weights, state):
    assert weights.keys() == state.keys()
    for name, t in state.items():
        torch.testing.assert_close(weights[name], t, atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("shards", [1, 3])
def test_safetensors_round_trip_to_meta_layout(state, hf_state, tiny_args, tmp_path, shards):
    path = write_hf_state(hf_state, hf_config(tiny_args), tmp_path / "m", shards=shards)

    ckpt = load(path)

    assert ckpt.format == "hf" and ckpt.dtype == torch.float32 and ckpt.args == tiny_args
    _assert_same_weights(ckpt.weights, state)  # q/k un-permuted back to interleaved pairs


def test_pytorch_model_bin(state, hf_state, tiny_args, tmp_path):
    path = tmp_path / "m"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(hf_config(tiny_args)))
    torch.save(
        hf_state | {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)},
        path / "pytorch_model.bin",
    )

    ckpt = load_checkpoint(path)

    _assert_same_weights(ckpt.weights, state)


def test_tied_embeddings_have_no_output_weight(state, tiny_args, tmp_path):
    args = replace(tiny_args, tie_embeddings=True)
    hf_state = meta_to_hf(state, args)
    path = write_hf_state(hf_state, hf_config(args), tmp_path / "tied")
    with_head = write_hf_state(
        hf_state | {"lm_head.weight": hf_state["model.embed_tokens.weight"].clone()},
        hf_config(args),
        tmp_path / "both",
    )

    for ckpt in (load(path), load(with_head)):
        assert ckpt.args.tie_embeddings
        assert "output.weight" not in ckpt.weights


def test_explicit_head_dim(tiny_args, tmp_path):
    from llamarun.model import Transformer

    args = replace(tiny_args, head_dim=32)  # n_heads * head_dim = 128 != dim = 64
    state = llamarun_state(Transformer(args))
    path = write_hf_state(meta_to_hf(state, args), hf_config(args), tmp_path / "m")

    ckpt = load(path)

    assert ckpt.args.head_dim == 32
    _assert_same_weights(ckpt.weights, state)


@pytest.mark.parametrize(
    "rope",
    [
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            }
        },
        {
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        },
        {
            "rope_theta": 500000.0,
            "rope_scaling": {
                "type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        },
    ],
    ids=["rope_parameters", "rope_scaling", "rope_scaling_type"],
)
def test_both_rope_config_styles(hf_state, tiny_args, tmp_path, rope):
    config = {k: v for k, v in hf_config(tiny_args).items() if k != "rope_parameters"} | rope
    ckpt = load(write_hf_state(hf_state, config, tmp_path / "m"))

    assert ckpt.args.rope_theta == 500000.0
    assert ckpt.args.rope_scaling == LLAMA3


def test_plain_rope_theta_and_no_scaling(hf_state, tiny_args, tmp_path):
    config = {k: v for k, v in hf_config(tiny_args).items() if k != "rope_parameters"} | {
        "rope_theta": 100000.0,
        "rope_scaling": None,
    }
    ckpt = load(write_hf_state(hf_state, config, tmp_path / "m"))

    assert ckpt.args.rope_theta == 100000.0 and ckpt.args.rope_scaling is None


def test_eos_token_id_list_becomes_stop_ids(hf_state, tiny_args, tmp_path):
    path = write_hf_state(hf_state, hf_config(tiny_args, eos_token_id=[1, 7]), tmp_path / "m")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    write_hf_tokenizer(path)

    tokenizer = load(path).tokenizer

    assert tokenizer is not None and {1, 7, 9} <= tokenizer.stop_ids


@pytest.mark.parametrize("where", ["string", "list", "jinja"])
def test_chat_template(hf_state, tiny_args, tmp_path, where):
    path = write_hf_state(hf_state, hf_config(tiny_args), tmp_path / "m")
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    config = {"chat_template": template}
    if where == "list":
        config = {
            "chat_template": [
                {"name": "tool_use", "template": "x"},
                {"name": "default", "template": template},
            ]
        }
    elif where == "jinja":
        config = {}
        (path / "chat_template.jinja").write_text(template)
    (path / "tokenizer_config.json").write_text(json.dumps(config))

    assert load(path).chat_template == template


def _error(path) -> str:
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    return str(e.value)


def test_missing_shard_file_is_named(hf_state, tiny_args, tmp_path):
    path = write_hf_state(hf_state, hf_config(tiny_args), tmp_path / "m", shards=3)
    (path / "model-00002-of-00003.safetensors").unlink()

    message = _error(path)

    assert (
        "model-00002-of-00003.safetensors" in message
        and str(path) in message
        and "Download" in message
    )


def test_missing_tensor_is_named_by_its_hf_name(hf_state, tiny_args, tmp_path):
    del hf_state["model.layers.1.mlp.up_proj.weight"]
    path = write_hf_state(hf_state, hf_config(tiny_args), tmp_path / "m")

    message = _error(path)

    assert (
        "model.layers.1.mlp.up_proj.weight" in message
        and str(path) in message
        and "incomplete" in message
    )


def test_shape_disagreeing_with_config_is_named(hf_state, tiny_args, tmp_path):
    path = write_hf_state(hf_state, hf_config(tiny_args, intermediate_size=96), tmp_path / "m")

    message = _error(path)

    assert (
        "layers.0.feed_forward.w1.weight" in message
        and "(128, 64)" in message
        and "(96, 64)" in message
    )
    assert str(path) in message and "different model" in message


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_is_one_sentence_naming_the_file(hf_state, tiny_args, tmp_path, damage):
    path = write_hf_state(hf_state, hf_config(tiny_args), tmp_path / "m")
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 64)

    message = _error(path)

    assert str(file) in message and "download it again" in message and "\n" not in message


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"model_type": "gemma", "architectures": ["GemmaForCausalLM"]}, "'gemma'"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        (
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}},
            "'yarn'",
        ),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0}}, "factor"),
        ({"hidden_size": None}, "'hidden_size'"),
        ({"num_attention_heads": 3}, "divisible"),
    ],
)
def test_unsupported_or_invalid_config(hf_state, tiny_args, tmp_path, change, expected):
    path = write_hf_state(hf_state, hf_config(tiny_args) | change, tmp_path / "m")

    message = _error(path)

    assert str(path / "config.json") in message and expected in message


def test_unsupported_model_type_lists_the_supported_ones(hf_state, tiny_args, tmp_path):
    path = write_hf_state(hf_state, hf_config(tiny_args, model_type="qwen2"), tmp_path / "m")

    message = _error(path)

    assert "'qwen2'" in message and "'llama'" in message and "'mistral'" in message


def test_bias_tensors_are_refused(hf_state, tiny_args, tmp_path):
    hf_state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    path = write_hf_state(hf_state, hf_config(tiny_args), tmp_path / "m")

    message = _error(path)

    assert "model.layers.0.self_attn.q_proj.bias" in message and str(path) in message


def test_invalid_config_json(hf_state, tiny_args, tmp_path):
    path = write_hf_state(hf_state, hf_config(tiny_args), tmp_path / "m")
    (path / "config.json").write_text("{ broken")

    message = _error(path)

    assert (
        str(path / "config.json") in message
        and "not valid JSON" in message
        and "restore" in message
    )


def test_folder_with_config_but_no_weights(tiny_args, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hf_config(tiny_args)))

    message = _error(tmp_path)

    assert str(tmp_path) in message and "safetensors" in message


def test_safetensors_preferred_over_pytorch_model_bin(state, hf_state, tiny_args, tmp_path):
    path = write_hf_state(hf_state, hf_config(tiny_args), tmp_path / "m")
    (path / "pytorch_model.bin").write_bytes(b"not read")
    (path / "pytorch_model.bin.index.json").write_text("{}")

    _assert_same_weights(load(path).weights, state)


def test_numbered_shards_without_index_must_all_be_there(hf_state, tiny_args, tmp_path):
    path = write_hf_state(hf_state, hf_config(tiny_args), tmp_path / "m", shards=3)
    (path / "model.safetensors.index.json").unlink()
    (path / "model-00003-of-00003.safetensors").unlink()

    message = _error(path)

    assert "model-00003-of-00003.safetensors" in message and str(path) in message


def test_sharded_pytorch_model_bin_with_index(state, hf_state, tiny_args, tmp_path):
    path = tmp_path / "m"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(hf_config(tiny_args)))
    names = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    weight_map = {k: names[i % 2] for i, k in enumerate(sorted(hf_state))}
    for name in names:
        torch.save({k: v for k, v in hf_state.items() if weight_map[k] == name}, path / name)
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))

    _assert_same_weights(load_checkpoint(path).weights, state)
    (path / names[1]).unlink()
    assert names[1] in _error(path)
