"""`llamarun doctor [MODEL]`: this machine as torch sees it, the classic failures with their fix,
and for MODEL a table of what fits here per dtype and quantization.

Facts come from `device.probe_machine()`; everything below is pure functions of those facts, so
tests give a faked `Machine` to each diagnosis. Never initialises torch.distributed (NCCL and
gloo are reported from what this torch was built with, GPU peer access from CUDA's own query).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from packaging.version import InvalidVersion, Version

from ..device import Machine, probe_machine
from ..plan import fewest_offloaded, fmt_gb, option
from ..weights import packed_label
from .info import add_memory_args, context_length, describe_target, memory_rows, render_table

# Oldest NVIDIA driver that runs any CUDA x.y build of that major version (minor version
# compatibility; NVIDIA's CUDA Toolkit release notes, "CUDA Driver" tables).
MIN_DRIVER = {
    11: {"Linux": "450.80.02", "Windows": "452.39"},
    12: {"Linux": "525.60.13", "Windows": "527.41"},
    13: {"Linux": "580.65.06", "Windows": "580.88"},
}
# CUDA versions PyTorch publishes wheels for (https://download.pytorch.org/whl/cuXYZ).
WHEEL_CUDA = ("11.8", "12.1", "12.4", "12.6", "12.8", "12.9", "13.0")


@dataclass(frozen=True)
class Finding:
    level: str  # "error" (llamarun cannot use the hardware), "warning", or "note"
    text: str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="checkpoint path, cached catalogue name or known shape (e.g. llama-2-7b): show what fits",
    )
    add_memory_args(parser)


def run(args: argparse.Namespace) -> int:
    machine = probe_machine()
    print(report(machine))
    findings = diagnose(machine)
    print()
    print("Diagnosis:")
    for f in findings or [Finding("ok", "no problems found")]:
        print(f"  {f.level}: {f.text}")
    if args.model is not None:
        model_args, header = describe_target(args.model, pull=False)
        print()
        print(
            fit_table(
                machine,
                model_args,
                context_length(model_args, args.max_seq_len),
                args.batch,
                stored=header.tensors if header is not None and header.packed else None,
            )
        )
    return 1 if any(f.level == "error" for f in findings) else 0


def report(m: Machine) -> str:
    build = (
        f"CUDA {m.torch_cuda} build"
        if m.torch_cuda
        else f"ROCm {m.torch_hip} build"
        if m.torch_hip
        else "CPU-only build"
    )
    lines = [("system", f"{m.os}, Python {m.python}"), ("torch", f"{m.torch} ({build})")]
    for g in m.gpus:
        lines.append(
            (
                f"GPU {g.index}",
                f"{g.name}, compute capability {g.capability[0]}.{g.capability[1]}, {fmt_gb(g.total)} total, {fmt_gb(g.free)} free",
            )
        )
    if not m.gpus:
        seen = f" (nvidia-smi lists {', '.join(m.smi_gpus)})" if m.smi_gpus else ""
        lines.append(("GPUs", f"none visible to torch{seen}"))
    if m.driver:
        lines.append(
            (
                "NVIDIA driver",
                m.driver + (f" (supports CUDA up to {m.driver_cuda})" if m.driver_cuda else ""),
            )
        )
    else:
        lines.append(("NVIDIA driver", "none found (no nvidia-smi, no /proc/driver/nvidia)"))
    if m.distributed:
        lines.append(
            ("distributed", f"gloo {'yes' if m.gloo else 'no'}, NCCL {'yes' if m.nccl else 'no'}")
        )
    else:
        lines.append(("distributed", "torch.distributed is not built into this torch"))
    if m.peer_access:
        pairs = ", ".join(f"{i}<->{j} {'yes' if ok else 'no'}" for i, j, ok in m.peer_access)
        lines.append(("peer access", f"GPUs {pairs}"))
    mps = (
        "available"
        if m.mps_available
        else "built but not available"
        if m.mps_built
        else "not built into this torch"
    )
    lines.append(("Apple MPS", mps))
    physical = f"{m.cpu_physical} physical / " if m.cpu_physical else ""
    lines.append(
        (
            "CPU",
            f"{physical}{m.cpu_logical} logical cores; RAM {fmt_gb(m.ram_total)} total, {fmt_gb(m.ram_available)} available",
        )
    )
    device, dtype = default_device(m)
    lines.append(
        (
            "llamarun uses",
            f"{device} in {str(dtype).removeprefix('torch.')} by default (change with --device/--dtype)",
        )
    )
    return "\n".join(f"{label:<15}{value}" for label, value in lines)


def default_device(m: Machine) -> tuple[str, torch.dtype]:
    """What pick_device/pick_dtype choose on machine `m`."""
    if m.cuda_available and m.gpus:
        bf16 = m.gpus[0].capability >= (8, 0) or m.torch_hip is not None
        return "cuda", torch.bfloat16 if bf16 else torch.float16
    if m.mps_available:
        return "mps", torch.float16
    return "cpu", torch.float32


def diagnose(m: Machine) -> list[Finding]:
    """The classic failures on this machine, each with its fix; notes for harmless limits."""
    out: list[Finding] = []
    gpu_words = f" ({', '.join(m.smi_gpus)})" if m.smi_gpus else ""
    driver_words = f" with driver {m.driver}" if m.driver else ""
    if m.nvidia_present and m.torch_cuda is None:
        kind = f"a ROCm (AMD) build, {m.torch}" if m.torch_hip else f"a CPU-only build, {m.torch}"
        out.append(
            Finding(
                "error",
                (
                    f"this machine has an NVIDIA GPU{gpu_words}{driver_words} but torch is {kind}: reinstall torch "
                    f"with CUDA: pip install --force-reinstall torch --index-url https://download.pytorch.org/whl/{wheel_tag(m.driver_cuda)}"
                ),
            )
        )
    elif m.torch_cuda and m.driver and driver_too_old(m.driver, m.torch_cuda, m.os):
        need = MIN_DRIVER[_major(m.torch_cuda)][_os_family(m.os)]
        out.append(
            Finding(
                "error",
                (
                    f"the NVIDIA driver {m.driver} is older than this torch's CUDA {m.torch_cuda} build needs "
                    f"(driver >= {need}): update the NVIDIA driver, or install a torch built for the CUDA this "
                    f"driver supports: pip install --force-reinstall torch --index-url https://download.pytorch.org/whl/{wheel_tag(m.driver_cuda)}"
                ),
            )
        )
    elif m.torch_cuda and m.nvidia_present and not m.cuda_available:
        visible = (
            f" (CUDA_VISIBLE_DEVICES={m.visible_devices!r} hides GPUs)"
            if m.visible_devices is not None
            else ""
        )
        out.append(
            Finding(
                "error",
                (
                    f"torch is a CUDA {m.torch_cuda} build and an NVIDIA driver{driver_words} is present, but torch sees no GPU{visible}: "
                    "check that nvidia-smi works, that CUDA_VISIBLE_DEVICES lists the GPU, and in a container that it was started with --gpus all"
                ),
            )
        )
    for g in m.gpus:
        if m.arch_list and not arch_supported(g.capability, m.arch_list):
            out.append(
                Finding(
                    "error",
                    (
                        f"GPU {g.index} ({g.name}) has compute capability {g.capability[0]}.{g.capability[1]}, which this torch "
                        f"has no kernels for (built for {', '.join(m.arch_list)}): install a torch build for a newer CUDA "
                        '("no kernel image is available" errors otherwise), or run with --device cpu'
                    ),
                )
            )
        elif g.capability < (8, 0) and m.torch_hip is None:
            out.append(
                Finding(
                    "note",
                    f"GPU {g.index} ({g.name}) has no bfloat16 support (compute capability below 8.0): llamarun runs it in float16",
                )
            )
    if not m.distributed:
        out.append(
            Finding(
                "note",
                "torch.distributed is missing: fine for one device; multi-GPU tensor parallelism (--tp) needs a torch built with it",
            )
        )
    elif not m.nccl:
        level = "warning" if len(m.gpus) > 1 else "note"
        out.append(
            Finding(
                level,
                (
                    "NCCL is not available in this torch: fine for one device (llamarun never touches torch.distributed "
                    "then); it is needed only for tensor parallelism across several NVIDIA GPUs (--tp), which needs a Linux CUDA build of torch"
                ),
            )
        )
    blocked = [(i, j) for i, j, ok in m.peer_access if not ok]
    if blocked:
        pairs = ", ".join(f"{i} and {j}" for i, j in blocked)
        out.append(
            Finding(
                "note",
                (
                    f"GPUs {pairs} cannot read each other's memory directly (no NVLink or PCIe peer-to-peer): "
                    "NCCL copies through host memory, which --tp pays in every layer; keep --tp to GPUs "
                    "with peer access and split across the others with --pp"
                ),
            )
        )
    if m.distributed and not m.gloo:
        out.append(
            Finding(
                "note",
                "gloo is not available: tensor parallelism on CPU processes cannot run; one process is unaffected",
            )
        )
    if m.mps_built and not m.mps_available:
        out.append(
            Finding(
                "note",
                "this torch has Apple MPS support but this Mac cannot use it (it needs macOS 12.3+ on Apple silicon or an AMD GPU); llamarun uses the CPU",
            )
        )
    return out


def driver_too_old(driver: str, torch_cuda: str, os_name: str) -> bool:
    need = MIN_DRIVER.get(_major(torch_cuda), {}).get(_os_family(os_name))
    try:
        return need is not None and Version(driver) < Version(need)
    except InvalidVersion:
        return False


def wheel_tag(driver_cuda: str | None) -> str:
    """The newest PyTorch CUDA wheel the driver can run (cu126 when the driver's CUDA is unknown)."""
    if driver_cuda is None:
        return "cu126"
    try:
        fitting = [v for v in WHEEL_CUDA if Version(v) <= Version(driver_cuda)]
    except InvalidVersion:
        fitting = []
    return "cu" + (fitting[-1] if fitting else WHEEL_CUDA[0]).replace(".", "")


def arch_supported(capability: tuple[int, int], arch_list: tuple[str, ...]) -> bool:
    """Kernels for sm_XY run on the same major with an equal or higher minor; compute_XY (PTX) is
    compiled by the driver for any GPU at least that new."""
    major, minor = capability
    for arch in arch_list:
        kind, _, digits = arch.partition("_")
        if not digits.isdigit():
            continue
        a_major, a_minor = int(digits[:-1]), int(digits[-1])
        if kind == "sm" and a_major == major and a_minor <= minor:
            return True
        if kind == "compute" and (a_major, a_minor) <= (major, minor):
            return True
    return False


def fit_table(m: Machine, args, seq_len: int, batch: int, *, stored: dict | None = None) -> str:
    """What fits on the default device of `m`, per dtype and quantization; offload for GPUs."""
    device, _ = default_device(m)
    gpu = device != "cpu"
    free = m.gpus[0].free if device == "cuda" else m.ram_available
    rows = memory_rows(args, batch, seq_len, gpu=gpu, stored=stored)
    verdicts = []
    for o in rows:
        if o.total <= free:
            verdicts.append("yes")
            continue
        off = (
            fewest_offloaded(
                args,
                lambda q, n, o=o: option(
                    args,
                    o.dtype,
                    q,
                    batch,
                    seq_len,
                    gpu=gpu,
                    offload_layers=n,
                    stored=stored if stored and q == packed_label(stored) else None,
                ),
                o.quantize,
                free,
                m.ram_available,
            )
            if device == "cuda"
            else None
        )
        verdicts.append(f"with --offload ({off.offload_layers} layers on CPU)" if off else "no")
    where = (
        f"GPU 0 ({m.gpus[0].name}), {fmt_gb(free)} free"
        if device == "cuda"
        else f"{device}, {fmt_gb(free)} of RAM available"
    )
    title = f"What fits on {where}, at {seq_len} tokens of context x {batch} row(s):"
    return title + "\n" + render_table(rows, {"fits": verdicts})


def _major(version: str) -> int:
    try:
        return Version(version).major
    except InvalidVersion:
        return 0


def _os_family(os_name: str) -> str:
    return "Windows" if os_name.lower().startswith("windows") else "Linux"
