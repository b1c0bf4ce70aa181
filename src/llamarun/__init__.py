"""llamarun: run LLaMA-family models on your own machine.

import llamarun
llm = llamarun.load("path/to/checkpoint")
print(llm.complete("Once upon a time", llamarun.SamplingParams(temperature=0)))
"""

from __future__ import annotations

from .build import build_model, load, prepare
from .config import ModelArgs
from .errors import CheckpointError, ConfigError, LlamarunError, RequestError, TokenizerError
from .llama import Llama
from .llm import LLM, Completion
from .model import Transformer
from .sampling import SamplingParams

__all__ = [
    "LLM",
    "Llama",
    "Completion",
    "ModelArgs",
    "SamplingParams",
    "Transformer",
    "load",
    "prepare",
    "build_model",
    "LlamarunError",
    "CheckpointError",
    "ConfigError",
    "RequestError",
    "TokenizerError",
]
