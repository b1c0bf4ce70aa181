"""llamarun: run LLaMA-family models on your own machine.

import llamarun
llm = llamarun.load("path/to/checkpoint")
print(llm.complete("Once upon a time", llamarun.SamplingParams(temperature=0)))

The names below are imported on first use (PEP 562), so `llamarun --help`, which imports this
package before the command line, does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import CheckpointError, ConfigError, LlamarunError, RequestError, TokenizerError

if TYPE_CHECKING:
    from .build import build_model, load, prepare
    from .config import ModelArgs
    from .llama import Llama
    from .llm import LLM, Completion
    from .model import Transformer
    from .sampling import SamplingParams

_LAZY = {
    "load": "build",
    "prepare": "build",
    "build_model": "build",
    "ModelArgs": "config",
    "Llama": "llama",
    "LLM": "llm",
    "Completion": "llm",
    "Transformer": "model",
    "SamplingParams": "sampling",
}

__all__ = [
    "load",
    "prepare",
    "build_model",
    "ModelArgs",
    "Llama",
    "LLM",
    "Completion",
    "Transformer",
    "SamplingParams",
    "LlamarunError",
    "CheckpointError",
    "ConfigError",
    "RequestError",
    "TokenizerError",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'llamarun' has no attribute {name!r}")
