"""Device and dtype choice, prompts from any device, no torch.distributed for one device, probes."""

import numpy as np
import pytest
import torch
from tiny import llamarun_state, meta_params, write_meta

import llamarun
from llamarun.device import as_token_ids, pick_device, pick_dtype, probe_machine
from llamarun.errors import ConfigError, RequestError
from llamarun.llm import LLM
from llamarun.sampling import SamplingParams

no_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
GREEDY = SamplingParams(temperature=0, max_new_tokens=6)


def fake_accelerators(monkeypatch, *, cuda: bool, mps: bool, bf16: bool = True):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.mark.parametrize(
    ("cuda", "mps", "expected"), [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")]
)
def test_best_device_is_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    fake_accelerators(monkeypatch, cuda=cuda, mps=mps)

    assert pick_device().type == expected


@pytest.mark.parametrize(
    ("device", "bf16", "expected"),
    [("cuda", True, torch.bfloat16), ("cuda", False, torch.float16), ("cpu", True, torch.float32)],
)
def test_default_dtype_is_bf16_where_supported_fp16_on_older_gpus_fp32_on_cpu(
    monkeypatch, device, bf16, expected
):
    fake_accelerators(monkeypatch, cuda=True, mps=False, bf16=bf16)

    assert pick_dtype(None, torch.device(device)) == expected
    assert pick_dtype("float16", torch.device(device)) == torch.float16


def test_device_and_dtype_mistakes_are_config_errors(monkeypatch):
    fake_accelerators(monkeypatch, cuda=False, mps=False)

    with pytest.raises(ConfigError, match="not a device name"):
        pick_device("gpu0")
    with pytest.raises(ConfigError, match="no usable CUDA GPU; run `llamarun doctor`"):
        pick_device("cuda")
    with pytest.raises(ConfigError, match="choose float32, bfloat16 or float16"):
        pick_dtype("float8", torch.device("cpu"))


def test_prompts_as_lists_arrays_or_tensors_become_plain_ids():
    assert as_token_ids([1, 2, 3]) == [1, 2, 3]
    assert as_token_ids((1, 2)) == [1, 2]
    assert as_token_ids(np.array([4, 5], dtype=np.int64)) == [4, 5]
    assert as_token_ids(torch.tensor([[7, 8, 9]])) == [7, 8, 9]  # a batch of one
    assert as_token_ids([torch.tensor(3), torch.tensor(4)]) == [3, 4]
    with pytest.raises(RequestError, match="1-D integer token ids"):
        as_token_ids(torch.zeros(2, 3))


def test_generate_takes_tensor_prompts_like_lists(tiny_model):
    tiny_model.setup_caches(2, 32)
    llm = LLM(tiny_model, None)
    prompts = [[5, 6, 7], [9, 10]]

    from_lists = list(llm.generate(prompts, GREEDY))
    from_tensors = list(llm.generate([torch.tensor(p) for p in prompts], GREEDY))

    assert from_tensors == from_lists


def test_one_device_never_touches_torch_distributed(tmp_path, tiny_model, tiny_args, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.distributed must not be initialised for one device")

    monkeypatch.setattr(torch.distributed, "init_process_group", forbidden)
    monkeypatch.setattr(torch.distributed, "new_group", forbidden)
    path = write_meta(llamarun_state(tiny_model), meta_params(tiny_args), tmp_path / "tiny")

    llm = llamarun.load(path, device="cpu", max_seq_len=32)
    tokens = list(llm.generate([[1, 2, 3]], GREEDY))

    assert len(tokens) == GREEDY.max_new_tokens
    assert not torch.distributed.is_initialized()


SMI = "550.54.15, NVIDIA GeForce RTX 3060\n"
BANNER = "| NVIDIA-SMI 550.54.15    Driver Version: 550.54.15    CUDA Version: 12.4     |\n"


def test_probe_reads_the_driver_from_nvidia_smi():
    def run(argv):
        return SMI if len(argv) > 1 else BANNER

    machine = probe_machine(run=run, exists=lambda path: False)

    assert machine.nvidia_present
    assert (machine.driver, machine.driver_cuda, machine.smi_gpus) == (
        "550.54.15",
        "12.4",
        ("NVIDIA GeForce RTX 3060",),
    )
    assert machine.cpu_logical >= 1 and machine.ram_total > machine.ram_available > 0


def test_probe_without_nvidia_smi_or_driver():
    machine = probe_machine(run=lambda argv: None, exists=lambda path: False)

    assert not machine.nvidia_present
    assert machine.driver is None and machine.driver_cuda is None


@pytest.mark.cuda
@no_cuda
def test_cuda_is_chosen_with_bf16_and_cpu_prompts_run_on_it(tiny_model):
    device = pick_device()
    model = tiny_model.to(device=device, dtype=pick_dtype(None, device))
    model.setup_caches(1, 32)

    tokens = list(LLM(model, None).generate([torch.tensor([5, 6, 7])], GREEDY))

    assert device.type == "cuda" and pick_dtype(None, device) == torch.bfloat16
    assert len(tokens) == GREEDY.max_new_tokens


@pytest.mark.slow
def test_compile_time_is_reported_apart_from_load_and_decoding(tmp_path, tiny_model, tiny_args):
    path = write_meta(llamarun_state(tiny_model), meta_params(tiny_args), tmp_path / "tiny")
    eager = llamarun.load(path, device="cpu", max_seq_len=32)

    compiled = llamarun.load(path, device="cpu", max_seq_len=32, compile=True)

    assert compiled.info["compile_s"] > 0 and "compile_s" not in eager.info
    assert list(compiled.generate([[1, 2, 3]], GREEDY)) == list(eager.generate([[1, 2, 3]], GREEDY))


def gpu_decode():
    """benchmarks/gpu_decode.py as a module (benchmarks/ is not a package)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_decode.py"
    spec = importlib.util.spec_from_file_location("gpu_decode", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_decode"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmark_arithmetic(tiny_model, tiny_args):
    bench = gpu_decode()
    C, F, V, L = tiny_args.dim, tiny_args.hidden_dim, tiny_args.vocab_size, tiny_args.n_layers
    kv = tiny_args.n_kv_heads * tiny_args.head_dim
    per_layer = (2 * C * C + 2 * kv * C + 3 * C * F + 2 * C) * 4  # float32 linears and norms
    tiny_model.setup_caches(1, 16)  # caches and RoPE tables are not weights

    assert (
        bench.weight_bytes_read(tiny_model) == L * per_layer + (C + V * C) * 4
    )  # no embedding table
    assert bench.achieved_bandwidth(13_476_831_232, 200.0) == pytest.approx(2.695e12, rel=1e-3)
    assert bench.peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert bench.peak_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    results = [
        bench.Result("bfloat16", True, 100.0, 10**9),
        bench.Result("int8", True, 170.0, 5 * 10**8),
        bench.Result("transformers bfloat16", False, 25.0, 10**9),
    ]
    assert bench.ratios(results) == [
        "int8 / bfloat16: 1.70x (target >= 1.6x)",
        "bfloat16 / transformers: 4.00x (target >= 3x)",
    ]
    assert "100.0" in bench.render(results, 3.35e12) and "3%" in bench.render(results, 3.35e12)


def test_gpu_benchmark_runs_tiny_on_cpu(capsys):
    results = gpu_decode().main(
        ["--tiny", "--new-tokens", "3", "--modes", "dtype", "--no-transformers"]
    )

    assert [(r.label, r.compiled) for r in results] == [("float32", False)]
    assert results[0].tokens_per_s > 0
    assert "weights/token" in capsys.readouterr().out


@pytest.mark.slow
def test_gpu_benchmark_tiny_with_quantized_and_transformers(capsys):
    results = gpu_decode().main(["--tiny", "--new-tokens", "4"])

    assert [r.label for r in results] == ["float32", "int8", "int4", "transformers float32"]
    assert "transformers' logits match llamarun's" in capsys.readouterr().out


@pytest.mark.cuda
@no_cuda
def test_gpu_benchmark_on_the_gpu_quick(capsys):
    results = gpu_decode().main(["--new-tokens", "16", "--modes", "dtype", "--no-compile"])

    assert results[0].tokens_per_s > 0 and results[-1].label == "transformers bfloat16"
