"""Device and dtype choice (CUDA, then Apple MPS, then CPU; bf16 on GPUs that support it), token
inputs from any device, and the facts about this machine that `llamarun doctor` reports.

One process and one device never touch torch.distributed: nothing here initialises a process group.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import psutil
import torch

from .errors import ConfigError, RequestError

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
        if (
            device.type == "cuda"
            and device.index is not None
            and device.index >= torch.cuda.device_count()
        ):
            raise ConfigError(
                f"--device {device} was asked for but this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from 0"
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


def pick_dtype(
    dtype: str | torch.dtype | None, device: torch.device, *, flag: str = "--dtype"
) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None:
        if dtype not in DTYPES:
            raise ConfigError(
                f"{flag} {dtype!r} is not supported; choose float32, bfloat16 or float16"
            )
        return DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def as_token_ids(prompt: Sequence[int] | torch.Tensor) -> list[int]:
    """A prompt given as a list, a tuple, a numpy array or a 1-D tensor on any device, as plain ints
    (the engine builds its own tensors on the model's device from them)."""
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() == 2 and prompt.shape[0] == 1:
            prompt = prompt[0]
        if prompt.dim() != 1 or prompt.is_floating_point():
            raise RequestError(
                f"a prompt tensor must be 1-D integer token ids, got shape {tuple(prompt.shape)} of {prompt.dtype}",
                param="prompt",
            )
        return prompt.tolist()
    if hasattr(prompt, "tolist"):  # numpy arrays
        prompt = prompt.tolist()
    return [int(t) for t in prompt]


# ---- facts about this machine, for `llamarun doctor` (each probe replaceable in tests) ----


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    capability: tuple[int, int]
    total: int  # bytes
    free: int  # bytes


@dataclass(frozen=True)
class Machine:
    os: str
    python: str
    torch: str
    torch_cuda: str | None  # CUDA version torch was built with (torch.version.cuda)
    torch_hip: str | None  # ROCm/HIP version for ROCm builds
    cuda_available: bool
    gpus: tuple[GpuInfo, ...]
    arch_list: tuple[
        str, ...
    ]  # GPU architectures this torch has kernels for (sm_80, compute_90, ...)
    nvidia_present: bool  # nvidia-smi on PATH or /proc/driver/nvidia: an NVIDIA GPU and driver
    driver: str | None  # NVIDIA driver version from nvidia-smi
    driver_cuda: str | None  # newest CUDA the driver supports, from nvidia-smi's banner
    smi_gpus: tuple[str, ...]  # GPU names nvidia-smi lists
    visible_devices: str | None  # CUDA_VISIBLE_DEVICES, when set
    distributed: bool
    nccl: bool
    gloo: bool
    mps_built: bool
    mps_available: bool
    cpu_physical: int | None
    cpu_logical: int
    ram_total: int
    ram_available: int
    # (i, j, whether GPU i reads GPU j's memory directly: NVLink or PCIe peer-to-peer), i < j
    peer_access: tuple[tuple[int, int, bool], ...] = ()


def probe_machine(
    run: Callable[[list[str]], str | None] | None = None,
    exists: Callable[[str], bool] = os.path.exists,
    env: Mapping[str, str] = os.environ,
) -> Machine:
    """Look at this machine. `run(argv)` returns a command's stdout or None when it is missing or
    fails; `exists(path)` tests a file. Nothing here initialises torch.distributed."""
    run = run or run_command
    cuda = torch.cuda.is_available()
    gpus = tuple(_gpu(i) for i in range(torch.cuda.device_count())) if cuda else ()
    smi = run(["nvidia-smi", "--query-gpu=driver_version,name", "--format=csv,noheader"])
    rows = [line.split(",", 1) for line in (smi or "").strip().splitlines() if "," in line]
    banner = run(["nvidia-smi"]) if smi is not None else None
    match = re.search(r"CUDA Version:\s*([0-9.]+)", banner or "")
    dist = torch.distributed.is_available()
    mps = getattr(torch.backends, "mps", None)
    memory = psutil.virtual_memory()
    return Machine(
        os=platform.platform(),
        python=platform.python_version(),
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        torch_hip=getattr(torch.version, "hip", None),
        cuda_available=cuda,
        gpus=gpus,
        arch_list=tuple(torch.cuda.get_arch_list()) if cuda else (),
        nvidia_present=smi is not None or exists("/proc/driver/nvidia/version"),
        driver=rows[0][0].strip() if rows else _proc_driver_version(exists),
        driver_cuda=match.group(1) if match else None,
        smi_gpus=tuple(r[1].strip() for r in rows),
        visible_devices=env.get("CUDA_VISIBLE_DEVICES"),
        distributed=dist,
        nccl=dist and torch.distributed.is_nccl_available(),
        gloo=dist and torch.distributed.is_gloo_available(),
        mps_built=bool(mps and mps.is_built()),
        mps_available=bool(mps and mps.is_available()),
        cpu_physical=psutil.cpu_count(logical=False),
        cpu_logical=os.cpu_count() or 1,
        ram_total=memory.total,
        ram_available=memory.available,
        peer_access=tuple(
            (i, j, torch.cuda.can_device_access_peer(i, j))
            for i in range(len(gpus))
            for j in range(i + 1, len(gpus))
        ),
    )


def run_command(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _gpu(index: int) -> GpuInfo:
    props = torch.cuda.get_device_properties(index)
    free, total = torch.cuda.mem_get_info(index)
    return GpuInfo(index, props.name, (props.major, props.minor), total, free)


def _proc_driver_version(exists: Callable[[str], bool]) -> str | None:
    path = "/proc/driver/nvidia/version"
    if not exists(path):
        return None
    try:
        with open(path) as f:
            match = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9.]+)", f.read())
    except OSError:
        return None
    return match.group(1) if match else None
