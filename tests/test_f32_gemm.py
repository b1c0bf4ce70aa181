"""Float32 prompts on the CPU: cpu_kernels.f32_prompt_linear (oneDNN's GEMM by default, MKL's
through F.linear on request) is x @ w.T for the shapes the model hands it, falls back to F.linear
where autograd records, and is what CpuLinear and the float32 tiles take for a prompt's tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llamarun import cpu_kernels
from llamarun.cpu import CpuLinear


def close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal to float32 rounding: the error's norm within 1e-5 of the product's (a float32 sum
    of 768 products is ~1e-6 off; a wrong layout or transpose is off by ~1)."""
    if got.shape != expected.shape:
        return False
    err = (got.double() - expected.double()).norm()
    return bool(err <= 1e-5 * expected.double().norm() + 1e-30)


@pytest.mark.parametrize("choice", cpu_kernels.F32_GEMM_CHOICES)
@pytest.mark.parametrize(
    "shape",
    [(2, 5, 64, 172), (1, 7, 172, 64), (3, 1, 96, 40), (1, 256, 768, 2048)],
    ids=["swiglu-in", "swiglu-out", "one-token", "110M"],
)
def test_the_prompt_product_is_x_times_w_transposed(monkeypatch, choice, shape):
    monkeypatch.setattr(cpu_kernels, "F32_GEMM", choice)
    B, T, K, N = shape
    torch.manual_seed(0)
    x, w = torch.randn(B, T, K), torch.randn(N, K)

    assert close(cpu_kernels.f32_prompt_linear(x, w), x.double().matmul(w.double().T).float())


def test_a_strided_weight_an_empty_prompt_and_inference_mode():
    torch.manual_seed(1)
    x = torch.randn(4, 64)
    padded = torch.randn(40, 96)
    w = padded[:, :64]  # what tiled_linear hands on for a padded width

    assert close(cpu_kernels.f32_prompt_linear(x, w), F.linear(x, w))
    assert cpu_kernels.f32_prompt_linear(torch.empty(0, 64), w).shape == (0, 40)
    with torch.inference_mode():
        assert close(cpu_kernels.f32_prompt_linear(x, w), F.linear(x, w))


def test_autograd_keeps_torch_and_its_gradients():
    torch.manual_seed(2)
    x = torch.randn(3, 5, 32, requires_grad=True)
    w = torch.randn(8, 32)

    cpu_kernels.f32_prompt_linear(x, w).sum().backward()

    assert close(x.grad, w.sum(0).expand(3, 5, 32))


@pytest.mark.skipif(cpu_kernels.ops() is None, reason="no CPU kernels here")
def test_cpu_linear_sends_prompts_to_the_gemm_and_single_tokens_to_the_kernel(monkeypatch):
    calls = []
    real = cpu_kernels.f32_prompt_linear
    monkeypatch.setattr(
        cpu_kernels, "f32_prompt_linear", lambda x, w: calls.append(x.shape) or real(x, w)
    )
    torch.manual_seed(3)
    layer = CpuLinear(64, 24, bias=False)
    prompt, token = torch.randn(2, 6, 64), torch.randn(2, 1, 64)

    with torch.no_grad():
        assert close(layer(prompt), F.linear(prompt, layer.weight))
        assert close(layer(token), F.linear(token, layer.weight))

    assert calls == [prompt.shape]


def test_an_unknown_choice_falls_back_to_onednn(monkeypatch, caplog):
    monkeypatch.setenv("LLAMARUN_CPU_F32_GEMM", "blas")
    assert cpu_kernels._f32_gemm_choice() == "onednn"
    assert "LLAMARUN_CPU_F32_GEMM=blas" in caplog.text
    monkeypatch.setenv("LLAMARUN_CPU_F32_GEMM", "MKL")
    assert cpu_kernels._f32_gemm_choice() == "mkl"


@pytest.mark.skipif(cpu_kernels._ONEDNN_LINEAR is None, reason="this torch has no oneDNN linear")
def test_onednn_is_what_runs_unless_mkl_is_asked_for(monkeypatch):
    calls = []
    real = cpu_kernels._ONEDNN_LINEAR
    monkeypatch.setattr(cpu_kernels, "_ONEDNN_LINEAR", lambda *a: calls.append(1) or real(*a))
    x, w = torch.randn(3, 16), torch.randn(4, 16)

    monkeypatch.setattr(cpu_kernels, "F32_GEMM", "onednn")
    cpu_kernels.f32_prompt_linear(x, w)
    cpu_kernels.f32_prompt_linear(x.double(), w.double())  # not float32: F.linear
    monkeypatch.setattr(cpu_kernels, "F32_GEMM", "mkl")
    cpu_kernels.f32_prompt_linear(x, w)

    assert calls == [1]


@pytest.mark.skipif(cpu_kernels.ops() is None, reason="no CPU kernels here")
def test_describe_names_the_float32_gemm(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "F32_GEMM", "mkl")
    assert "; float32 prompts: torch's F.linear (MKL's sgemm in its x86 builds); " in (
        cpu_kernels.describe()
    )
    if cpu_kernels._ONEDNN_LINEAR is not None:
        monkeypatch.setattr(cpu_kernels, "F32_GEMM", "onednn")
        assert "; float32 prompts: oneDNN's GEMM; GGUF prompts: " in cpu_kernels.describe()
