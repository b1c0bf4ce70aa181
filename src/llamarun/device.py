"""Device and dtype choice: CUDA, then Apple MPS, then CPU; bf16 on GPUs that support it."""

from __future__ import annotations

import torch

from .errors import ConfigError

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def pick_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        try:
            device = torch.device(device)
        except RuntimeError as e:
            raise ConfigError(
                f"--device {device!r} is not a device name; use cpu, cuda, cuda:N or mps"
            ) from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                "--device cuda was asked for but this torch has no usable CUDA GPU; run `llamarun doctor` or use --device cpu"
            )
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ConfigError(
                "--device mps was asked for but Apple MPS is not available; use --device cpu"
            )
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None:
        if dtype not in DTYPES:
            raise ConfigError(
                f"--dtype {dtype!r} is not supported; choose float32, bfloat16 or float16"
            )
        return DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32
