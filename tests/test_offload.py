"""Offload and the memory plan inside llamarun.load(), on CPU: both "devices" are the CPU, which
runs the same code path (wrapping, moving activations at the boundary) as CPU + GPU."""

import pytest
import torch
from tiny import llamarun_state, meta_params, write_meta

import llamarun
import llamarun.plan
from llamarun.errors import ConfigError, MemoryPlanError
from llamarun.offload import OffloadedBlock, block_devices, place_
from llamarun.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_new_tokens=12)


@pytest.fixture
def checkpoint(tmp_path, tiny_model, tiny_args):
    return write_meta(llamarun_state(tiny_model), meta_params(tiny_args), tmp_path / "tiny")


def greedy_tokens(llm) -> list[int]:
    return [row[0] for row in llm.generate([[5, 17, 42, 3]], GREEDY)]


def test_offloaded_half_gives_the_same_tokens_as_without(checkpoint):
    whole = llamarun.load(checkpoint, device="cpu", max_seq_len=64)
    half = llamarun.load(checkpoint, device="cpu", max_seq_len=64, offload_layers=1)

    assert not isinstance(half.model.layers[0], OffloadedBlock)
    assert isinstance(half.model.layers[1], OffloadedBlock)
    assert half.info["offload_layers"] == 1
    assert greedy_tokens(half) == greedy_tokens(whole)


def test_offloaded_block_moves_inputs_and_returns_to_the_next_device(tiny_model):
    tiny_model.setup_caches(1, 32)
    x = torch.randn(1, 3, tiny_model.args.dim)
    pos = torch.arange(3)[None]
    cos, sin = tiny_model.rope_cos[pos].unsqueeze(2), tiny_model.rope_sin[pos].unsqueeze(2)
    mask = (tiny_model.slot_ids <= pos.unsqueeze(-1)).unsqueeze(1)
    expected = tiny_model.layers[0](x, cos, sin, mask, pos, None)
    tiny_model.layers[0].attention.kv_cache.reset()

    wrapped = OffloadedBlock(tiny_model.layers[0], torch.device("cpu"), torch.device("meta"))
    out = wrapped(x, cos, sin, mask, pos, None)

    assert out.device.type == "meta"  # the output went to the next block's device
    assert wrapped.attention is tiny_model.layers[0].attention  # setup_caches/fuse_ still see it
    torch.testing.assert_close(
        wrapped.block(x, cos, sin, mask, pos, None), expected, rtol=0, atol=0
    )


def test_place_quantizes_each_block_on_its_device_then_the_rest(tiny_model):
    seen = []

    place_(
        tiny_model,
        torch.device("cpu"),
        torch.float32,
        n_offload=1,
        quantize=lambda m: seen.append(type(m).__name__),
    )

    assert seen == ["TransformerBlock", "TransformerBlock", "Transformer"]
    assert block_devices(tiny_model) == [torch.device("cpu")] * 2
    assert [type(b).__name__ for b in tiny_model.layers] == ["TransformerBlock", "OffloadedBlock"]


def test_offload_layers_out_of_range_is_a_config_error(checkpoint):
    with pytest.raises(ConfigError, match="offload_layers must be an integer from 0 to n_layers"):
        llamarun.load(checkpoint, device="cpu", offload_layers=3)


def test_plan_fails_before_any_weight_is_read(checkpoint, monkeypatch):
    def no_weights(*_args, **_kwargs):
        raise AssertionError("load_checkpoint must not run when the plan fails")

    monkeypatch.setattr(llamarun.plan, "free_memory", lambda device: 1000)
    monkeypatch.setattr(llamarun.build, "load_checkpoint", no_weights)

    with pytest.raises(
        MemoryPlanError, match=r"needs .* in float32 .* this machine's RAM has 1 kB free"
    ):
        llamarun.load(checkpoint, device="cpu", max_seq_len=64)


def test_auto_quantizes_when_only_int8_fits(checkpoint, tiny_args, monkeypatch):
    pytest.importorskip("llamarun.quantize")
    from llamarun.plan import option

    int8 = option(tiny_args, torch.float32, "int8", 1, 64, gpu=False)
    monkeypatch.setattr(llamarun.plan, "free_memory", lambda device: int8.total + 1)

    llm = llamarun.load(checkpoint, device="cpu", max_seq_len=64, quantize="auto")

    assert llm.info["quantize"] == "int8"
    assert not any(type(m) is torch.nn.Linear for m in llm.model.layers.modules())
    assert len(greedy_tokens(llm)) == GREEDY.max_new_tokens


@pytest.mark.slow
def test_cli_offload_layers_gives_the_same_text(capsys):
    from conftest import shared_model

    from llamarun.cli import main

    path = str(shared_model("stories260K/stories260K.bin"))
    texts = []
    for extra in ([], ["--offload-layers", "3"]):
        assert (
            main(
                [
                    "generate",
                    path,
                    "-p",
                    "Once upon a time",
                    "-n",
                    "24",
                    "-t",
                    "0",
                    "--quiet",
                    *extra,
                ]
            )
            == 0
        )
        texts.append(capsys.readouterr().out)

    assert texts[0] == texts[1] and "Lily" in texts[0]


@pytest.mark.slow
def test_offloading_packed_gguf_layers_keeps_their_layout_and_tokens():
    from conftest import shared_model

    path = shared_model("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
    whole = llamarun.load(path, device="cpu", max_seq_len=64)
    half = llamarun.load(path, device="cpu", max_seq_len=64, offload_layers=15)
    ids = whole.encode("The capital of France is")

    offloaded = half.model.layers[20].attention.wq
    assert offloaded.qtype == "Q4_1" and offloaded.data.dtype == torch.uint8  # the file's blocks
    assert greedy_tokens_of(half, ids) == greedy_tokens_of(whole, ids)


def greedy_tokens_of(llm, ids: list[int]) -> list[int]:
    return [row[0] for row in llm.generate([ids], GREEDY)]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_offload_on_a_gpu_runs_the_last_layer_on_the_cpu(checkpoint):
    whole = llamarun.load(checkpoint, device="cuda", dtype="float32", max_seq_len=64)
    half = llamarun.load(
        checkpoint, device="cuda", dtype="float32", max_seq_len=64, offload_layers=1
    )

    assert block_devices(half.model) == [torch.device("cuda", 0), torch.device("cpu")]
    assert half.model.layers[1].attention.kv_cache.k.device.type == "cpu"
    assert greedy_tokens(half) == greedy_tokens(whole)


def test_quantizing_block_by_block_while_offloading_equals_quantizing_whole(checkpoint):
    pytest.importorskip("llamarun.quantize")

    whole = llamarun.load(checkpoint, device="cpu", max_seq_len=64, quantize="int4")
    placed = llamarun.load(
        checkpoint, device="cpu", max_seq_len=64, quantize="int4", offload_layers=1
    )

    kinds = {type(m).__name__ for m in placed.model.modules()}
    assert "Int4Linear" in kinds and "Int8Linear" in kinds and "Linear" not in kinds  # output: int8
    assert greedy_tokens(placed) == greedy_tokens(whole)
