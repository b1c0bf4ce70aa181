"""cpu_kernels' build: the C++ sources ship with the package, describe() names the path, the
Decoder's linear kinds come from the extension, and a failed build falls back to torch."""

from __future__ import annotations

import importlib.resources
import logging
import re

import pytest
import torch

from llamarun import cpu_kernels
from llamarun.quantize import Int8Linear


def test_the_cpp_sources_ship_in_the_package_and_their_includes_resolve():
    csrc = importlib.resources.files("llamarun") / "csrc"
    names = {entry.name for entry in csrc.iterdir()}
    assert {"common.h", "ops.cpp", "decoder.cpp", "linear_kinds.h"} <= names
    assert str(csrc) == str(cpu_kernels.CSRC)
    for name in sorted(n for n in names if n.endswith((".h", ".cpp"))):
        for included in re.findall(r'^#include "([^"]+)"', (csrc / name).read_text(), re.M):
            assert included in names, f"{name} includes {included}, which is not in csrc/"


def test_describe_says_which_path_runs_in_one_sentence():
    text = cpu_kernels.describe()
    assert isinstance(text, str) and "\n" not in text
    if cpu_kernels.ops() is None:
        assert text.startswith("torch fallback: ")
    else:
        assert text.startswith(f"C++ kernels from {cpu_kernels.CSRC} (AVX2")


def test_linear_kinds_are_the_codes_the_decode_step_passes():
    if cpu_kernels.ops() is None:
        pytest.skip("no CPU kernels on this machine (needs x86 AVX2 and a C++ compiler)")
    assert cpu_kernels.linear_kinds() == {"NONE": 0, "F32": 1, "INT8": 2, "Q4": 3, "GGUF": 4}


def test_a_failed_build_warns_once_and_leaves_the_torch_path(monkeypatch, caplog):
    from torch.utils import cpp_extension

    calls = []

    def failing_load(**kwargs):
        calls.append(kwargs)
        raise RuntimeError(
            "Error building extension 'llamarun_cpu_kernels': [1/9] c++ ...\n"
            f"{cpu_kernels.CSRC}/matmul_q4.cpp:12:3: error: 'q4_rows' was not declared in this scope"
        )

    monkeypatch.setattr(cpu_kernels, "_state", {})  # as if nothing had tried to build yet
    monkeypatch.setattr(cpu_kernels, "_cpu_supported", lambda: True)
    monkeypatch.setattr(cpp_extension, "load", failing_load)
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        assert cpu_kernels.ops() is None
        assert cpu_kernels.ops() is None  # decided once: no second build, no second warning
        text = cpu_kernels.describe()
    assert len(calls) == 1
    assert sorted(calls[0]["sources"]) == sorted(str(p) for p in cpu_kernels.CSRC.glob("*.cpp"))
    assert calls[0]["extra_include_paths"] == [str(cpu_kernels.CSRC)]
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert text.startswith("torch fallback: the C++ kernels did not build (")
    assert "matmul_q4.cpp:12:3: error:" in text  # the real file and line
    with pytest.raises(RuntimeError, match="no CPU kernels"):
        cpu_kernels.linear_kinds()
    # Act: a quantized layer still runs, on the torch path
    torch.manual_seed(0)
    w, x = torch.randn(24, 64), torch.randn(2, 64)
    out = Int8Linear.from_float(w)(x)
    expected = x @ w.T
    assert float((out - expected).norm() / expected.norm()) < 0.02
