"""`llamarun doctor`: the report on this machine, and each diagnosis branch with faked probes."""

from dataclasses import replace

import pytest
import torch

import llamarun.cli.doctor as doctor
from llamarun.cli import main
from llamarun.cli.doctor import arch_supported, default_device, diagnose, wheel_tag
from llamarun.device import GpuInfo, Machine

GB = 10**9
CPU_BOX = Machine(
    os="Linux-6.8-x86_64",
    python="3.11.7",
    torch="2.5.1+cpu",
    torch_cuda=None,
    torch_hip=None,
    cuda_available=False,
    gpus=(),
    arch_list=(),
    nvidia_present=False,
    driver=None,
    driver_cuda=None,
    smi_gpus=(),
    visible_devices=None,
    distributed=True,
    nccl=False,
    gloo=True,
    mps_built=False,
    mps_available=False,
    cpu_physical=8,
    cpu_logical=16,
    ram_total=64 * GB,
    ram_available=48 * GB,
)
RTX_3060 = GpuInfo(0, "NVIDIA GeForce RTX 3060", (8, 6), 12 * GB, int(11.7 * GB))
GPU_BOX = replace(
    CPU_BOX,
    torch="2.5.1+cu124",
    torch_cuda="12.4",
    cuda_available=True,
    gpus=(RTX_3060,),
    nccl=True,
    arch_list=("sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"),
    nvidia_present=True,
    driver="550.54.15",
    driver_cuda="12.4",
    smi_gpus=(RTX_3060.name,),
)


def errors(machine: Machine) -> list[str]:
    return [f.text for f in diagnose(machine) if f.level == "error"]


def test_a_healthy_gpu_machine_has_no_findings():
    assert diagnose(GPU_BOX) == []
    assert default_device(GPU_BOX) == ("cuda", torch.bfloat16)


def test_cpu_machine_only_notes_that_nccl_is_missing():
    (finding,) = diagnose(CPU_BOX)

    assert finding.level == "note"
    assert "NCCL is not available" in finding.text and "fine for one device" in finding.text
    assert default_device(CPU_BOX) == ("cpu", torch.float32)


def test_nccl_missing_is_a_warning_with_several_gpus():
    box = replace(GPU_BOX, nccl=False, gpus=(RTX_3060, replace(RTX_3060, index=1)))

    assert [f.level for f in diagnose(box)] == ["warning"]


def test_cpu_only_torch_on_a_machine_with_an_nvidia_gpu():
    box = replace(
        GPU_BOX, torch="2.5.1+cpu", torch_cuda=None, cuda_available=False, gpus=(), arch_list=()
    )

    (text,) = errors(box)

    assert "has an NVIDIA GPU (NVIDIA GeForce RTX 3060) with driver 550.54.15" in text
    assert "torch is a CPU-only build, 2.5.1+cpu" in text
    assert text.endswith(
        "pip install --force-reinstall torch --index-url https://download.pytorch.org/whl/cu124"
    )


def test_cpu_only_torch_found_through_proc_driver_nvidia_only():
    box = replace(CPU_BOX, nvidia_present=True, driver="535.104.05")

    (text,) = errors(box)

    assert "driver 535.104.05" in text and text.endswith("/whl/cu126")  # driver's CUDA unknown


def test_driver_older_than_the_torch_cuda_build_needs():
    box = replace(GPU_BOX, cuda_available=False, gpus=(), driver="470.82.01", driver_cuda="11.4")

    (text,) = errors(box)

    assert (
        "driver 470.82.01 is older than this torch's CUDA 12.4 build needs (driver >= 525.60.13)"
        in text
    )
    assert text.endswith("/whl/cu118")


def test_windows_driver_minimum_differs():
    box = replace(
        GPU_BOX, os="Windows-10", cuda_available=False, gpus=(), driver="526.98", driver_cuda="12.0"
    )

    assert "(driver >= 527.41)" in errors(box)[0]


def test_driver_fine_but_torch_sees_no_gpu_points_at_visibility():
    box = replace(GPU_BOX, cuda_available=False, gpus=(), visible_devices="")

    (text,) = errors(box)

    assert "torch sees no GPU (CUDA_VISIBLE_DEVICES='' hides GPUs)" in text and "--gpus all" in text


def test_gpu_newer_than_the_torch_build_has_kernels_for():
    blackwell = GpuInfo(0, "NVIDIA RTX PRO 6000", (12, 0), 96 * GB, 95 * GB)

    (text,) = errors(replace(GPU_BOX, gpus=(blackwell,)))

    assert "compute capability 12.0, which this torch has no kernels for" in text


def test_kernel_compatibility_rules():
    assert arch_supported((8, 6), ("sm_80",))  # same major, newer minor runs sm_80 code
    assert not arch_supported((8, 0), ("sm_86",))
    assert arch_supported((12, 0), ("sm_90", "compute_90"))  # PTX is compiled for newer GPUs
    assert not arch_supported((9, 0), ("sm_80", "sm_86"))


def test_older_gpu_runs_in_float16():
    turing = GpuInfo(0, "Tesla T4", (7, 5), 16 * GB, 15 * GB)
    box = replace(GPU_BOX, gpus=(turing,))

    (finding,) = diagnose(box)

    assert finding.level == "note" and "no bfloat16 support" in finding.text
    assert default_device(box) == ("cuda", torch.float16)


def test_mps_built_but_unavailable_is_a_note():
    box = replace(CPU_BOX, os="macOS-11.7-x86_64", mps_built=True, nccl=False)

    assert any("Apple MPS" in f.text and f.level == "note" for f in diagnose(box))


def test_wheel_tag_is_the_newest_the_driver_can_run():
    assert wheel_tag("12.2") == "cu121"
    assert wheel_tag("13.1") == "cu130"
    assert wheel_tag(None) == "cu126"


def test_doctor_runs_on_this_machine(capsys):
    rc = main(["doctor"])

    out = capsys.readouterr().out
    assert rc in (0, 1)  # 1 only when a diagnosis is an error on this machine
    assert f"torch          {torch.__version__}" in out
    assert "Diagnosis:" in out


def test_doctor_with_an_error_exits_1(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "probe_machine", lambda: replace(CPU_BOX, nvidia_present=True))

    assert main(["doctor"]) == 1
    assert "error: this machine has an NVIDIA GPU" in capsys.readouterr().out


def test_doctor_model_table_on_a_12_gb_gpu(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "probe_machine", lambda: GPU_BOX)

    rc = main(["doctor", "llama-2-7b", "--max-seq-len", "2048"])

    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert rc == 0
    assert "What fits on GPU 0 (NVIDIA GeForce RTX 3060), 11.7 GB free, at 2048 tokens" in out
    assert rows["bfloat16"].endswith("with --offload (9 layers on CPU)")
    assert rows["int8"].endswith("yes") and rows["int4"].endswith("yes")


def test_doctor_never_downloads_a_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLAMARUN_HOME", str(tmp_path))
    monkeypatch.setattr(doctor, "probe_machine", lambda: CPU_BOX)

    rc = main(["doctor", "tinyllama-1.1b-chat"])

    assert rc == 2
    assert "run `llamarun pull tinyllama-1.1b-chat` first" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_doctor_sees_the_gpu(capsys):
    main(["doctor"])

    out = capsys.readouterr().out
    assert f"GPU 0          {torch.cuda.get_device_name(0)}, compute capability" in out


def test_gpus_without_peer_access_get_a_note_about_tensor_parallelism():
    second = replace(RTX_3060, index=1)
    machine = replace(GPU_BOX, gpus=(RTX_3060, second), peer_access=((0, 1, False),))

    assert "peer access    GPUs 0<->1 no" in doctor.report(machine)
    notes = [f.text for f in diagnose(machine) if f.level == "note"]
    assert any(
        "GPUs 0 and 1 cannot read each other's memory directly" in n and "--pp" in n for n in notes
    )
    linked = replace(machine, peer_access=((0, 1, True),))
    assert "0<->1 yes" in doctor.report(linked) and diagnose(linked) == []
