"""Shared fixtures: where the real model files are, and a tiny random model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from llamarun.config import ModelArgs
from llamarun.model import Transformer

MODELS_DIR = Path(
    os.environ.get(
        "LLAMARUN_TEST_MODELS", Path(__file__).resolve().parents[1] / ".." / "shared" / "models"
    )
).resolve()


def shared_model(relative: str) -> Path:
    """Path to a real file under LLAMARUN_TEST_MODELS, or skip the test with the reason."""
    path = MODELS_DIR / relative
    if not path.exists():
        pytest.skip(
            f"{path} not found (set LLAMARUN_TEST_MODELS to the folder holding the shared models)"
        )
    return path


@pytest.fixture
def tiny_args() -> ModelArgs:
    # n_kv_heads differs from n_heads so grouped-query attention is always exercised
    return ModelArgs(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=320, max_seq_len=128
    )


@pytest.fixture
def tiny_model(tiny_args) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(tiny_args)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model.eval()


@pytest.fixture(params=["kernel", "torch"])
def path(request, monkeypatch):
    """Run a layer test on the C++ kernels and on the plain torch fallback."""
    from llamarun import cpu_kernels

    if request.param == "kernel" and cpu_kernels.ops() is None:
        pytest.skip("no CPU kernels on this machine (needs x86 AVX2 and a C++ compiler)")
    if request.param == "torch":
        monkeypatch.setitem(cpu_kernels._state, "ops", None)
    return request.param


@pytest.fixture(scope="module")
def server():
    """The tiny server (tiny_server.py), one per test module; a module with a server of its own
    defines its own fixture of that name."""
    from tiny_server import tiny_server

    with tiny_server() as running:
        yield running
