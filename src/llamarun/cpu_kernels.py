"""Weight-only quantized matrix products for x86 CPUs, as a C++ extension built on first use.

Why: on AVX-512 machines torch's own `_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu` and even
MKL's float GEMV run far below memory bandwidth at batch 1 (issue 5). These kernels follow
llama.cpp's approach: activations are quantized per block of 32 (two int8 levels, ~15 bits), then
int8 x int8 (or 4-bit x int8) dot products run with VNNI `vpdpbusd` (AVX2 `vpmaddubsw` without
VNNI), one pass over each weight row shared by every batch row, each output summed in the same
order whatever the batch (batch invariance). On CPUs with AMX (Intel Sapphire Rapids and later)
per-channel int8 products of two or more rows can run on AMX tiles instead (`load(amx=True)`:
activations quantized per row, so not batch-invariant), which makes a batch nearly as cheap as
one row. GGUF block weights (packed.py) have their own kernels: matmul_gguf.cpp for one token per
row, gemm_gguf.cpp for a prompt's many (PROMPT).
Threads: torch's intra-op pool.

Also here: `Decoder`, the whole one-token decode step in C++ (used through cpu.py; at batch 1
the eager step's ~40 torch ops per layer cost more than its weight reads), `argmax_rows`, and the
eager forward's row-by-row `silu_mul`.

The C++ is in csrc/ as ordinary source files, one per concern (ops.cpp registers what Python
sees), shipped in the wheel as package data: so compiler errors name the real file and line, editors
and C++ tooling read the kernels, and each file stays small enough to review. They are compiled
with -march=native on first use, which is why they are not built into the wheel: one binary would
have to target the oldest CPU it runs on and lose VNNI/AVX-512/AMX everywhere else. The build lands
in ~/.cache/torch_extensions (once per machine; ninja recompiles only files that changed).
`ops()` returns None where no compiler, no x86 AVX2 or a failed build leaves only the torch path;
`describe()` says which one runs here.
"""

from __future__ import annotations

import logging
import os
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"  # the kernels' C++ sources (package data)
EXTENSION = "llamarun_cpu_kernels"

_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_supported() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return all(flag in flags for flag in (" avx2", " fma", " f16c"))


STALE_LOCK_S = 600  # a build takes well under this; an older lock was left by a killed build


def _clear_stale_lock(cpp_extension, name: str) -> None:
    """torch waits forever on the build folder's lock file, so one left behind by a build that was
    killed would hang every later run: remove it once it is clearly stale."""
    try:
        build_dir = cpp_extension._get_build_directory(name, False)
        lock = os.path.join(build_dir, "lock")
        if time.time() - os.path.getmtime(lock) > STALE_LOCK_S:
            os.remove(lock)
            log.warning("llamarun: removed a stale kernel build lock %s", lock)
    except (OSError, AttributeError, TypeError):
        pass  # no lock (the usual case), or a torch without this helper


def ops():
    """The namespace `torch.ops.llamarun_cpu` once the extension is built and loaded, else None."""
    if "ops" in _state:  # lock-free once decided (also what torch.compile traces)
        return _state["ops"]
    with _lock:
        if "ops" in _state:
            return _state["ops"]
        _state["ops"] = None
        if not _cpu_supported():
            _state["reason"] = "this CPU is not x86-64 with AVX2, FMA and F16C"
            return None
        from torch.utils import cpp_extension

        _clear_stale_lock(cpp_extension, EXTENSION)
        try:
            sources = sorted(str(p) for p in CSRC.glob("*.cpp"))
            if not sources:
                raise FileNotFoundError(f"no C++ sources in {CSRC}")
            library = cpp_extension.load(
                name=EXTENSION,
                sources=sources,
                extra_include_paths=[str(CSRC)],
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
                verbose=False,
            )
        # Any build failure (no compiler, odd toolchain, read-only cache) means the torch path.
        except Exception as e:  # noqa: BLE001
            _state["reason"] = f"the C++ kernels did not build ({_first_error(e)})"
            log.warning(
                "llamarun: CPU quantized kernels unavailable (%s); using the slower torch path", e
            )
            return None
        _register_fakes()
        _state["prompt_gemm"] = bool(torch.ops.llamarun_cpu.gguf_prompt_available())
        _state["library"] = library
        _state["ops"] = torch.ops.llamarun_cpu
        return _state["ops"]


def _first_error(e: Exception) -> str:
    """The line of a build failure worth quoting: the compiler's first `error:`, which names the
    csrc file and line, else the message's first line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    return next((line for line in lines if "error:" in line), lines[0])[:300]


def describe() -> str:
    """One sentence saying which path the CPU kernels take here (for CI logs and bug reports);
    builds the extension first if nothing has tried yet."""
    if ops() is None:
        return f"torch fallback: {_state.get('reason', 'the C++ kernels are switched off')}"
    where = f", loaded from {_state['library']}" if isinstance(_state.get("library"), str) else ""
    prompts = {2: "the integer GEMM, int16", 1: "the integer GEMM, int8"}.get(
        prompt_levels(), f"{_tile_dtype()} tiles".replace("torch.", "")
    )
    return (
        f"C++ kernels from {CSRC} ({torch.ops.llamarun_cpu.isa()}){where}; float32 prompts: "
        f"{_f32_gemm_name()}; GGUF prompts: {prompts}"
    )


def linear_kinds() -> dict[str, int]:
    """The code the extension's Decoder takes for each kind of linear ({"NONE": 0, "F32": 1, ...}),
    read from the built extension (csrc/linear_kinds.h defines them) so Python cannot drift."""
    if "kinds" not in _state:
        if ops() is None:
            raise RuntimeError(f"no CPU kernels to ask for linear kinds: {describe()}")
        names = torch.ops.llamarun_cpu.linear_kinds()
        _state["kinds"] = {name: code for code, name in enumerate(names)}
    return dict(_state["kinds"])


# float32 bytes of dequantized weight rows per product of a prompt (tiled_linear). Small enough
# that the buffer stays a few MB beside the weights; the GEMM gets >= 2048 rows per call for widths
# up to 1024, so a 110M-shape FFN matrix (2048 x 768) is one call: on an Intel Xeon with 2 MB of
# L2 per core 8 MB ran 110M prompts 8-9% faster than 4 MB (and 16 or 32 MB no faster still); on an
# AMD EPYC 256 KB to 4 MB had measured the same.
TILE_BYTES = 8 * 2**20
_TILES = threading.local()


PROMPT_CHOICES = ("int16", "int8", "float32", "bfloat16")


def _env_choice(var: str, choices: tuple[str, ...], default: str, otherwise: str) -> str:
    """The environment variable var's value among choices (default when unset); a value that is
    none of them logs a warning ending in `otherwise` and gives the default."""
    choice = os.environ.get(var, default).strip().lower()
    if choice not in choices:
        log.warning("%s=%s is not one of %s; %s", var, choice, ", ".join(choices), otherwise)
        return default
    return choice


def _prompt_choice() -> str:
    """How a prompt's tokens meet quantized weights: LLAMARUN_CPU_PROMPT_DTYPE (see PROMPT)."""
    choice = _env_choice("LLAMARUN_CPU_PROMPT_DTYPE", PROMPT_CHOICES, "int16", "prompts stay int16")
    if choice == "bfloat16" and not {"amx_bf16", "avx512_bf16"} & set(_cpu_flags()):
        log.warning(
            "LLAMARUN_CPU_PROMPT_DTYPE=bfloat16 on a CPU without AMX-BF16 or AVX512-BF16: torch's "
            "bfloat16 GEMM is slower than float32 here"
        )
    return choice


def _cpu_flags() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return []


# How a prompt's tokens (more than one per row) meet GGUF block weights on the CPU:
# - "int16" (the default): the 8-bit integer GEMM of csrc/gemm_gguf.cpp, activations in two int8
#   levels per 32 (about 15 bits, the one-token kernels' precision): a 256-token prefill ran
#   1.6-2x faster than on float32 tiles (an AMD Zen 4, 2 threads: 110M-shape Q4_0 1112-1230
#   tok/s against 617-657, SmolLM2 Q4_K_M 738 against 447). One product alone, its weights and
#   tiles warm in L3, ran from even (2.9 against 3.0 ms for 256 x 768 by 768 x 2048 Q4_0) to
#   2.4x; in a forward every tile is dequantized from fresh weights, which this GEMM never writes.
# - "int8": the same GEMM with one int8 level, as llama.cpp's Q8_0 / Q8_K activations: prefill
#   another 1.3-1.45x faster, at 8 bits (SmolLM2 Q4_1's perplexity +0.31%; greedy answers may
#   change).
# - "float32": float32 tiles dequantized by the kernels through torch's GEMM (tiled_linear), the
#   float32 computation itself.
# - "bfloat16": those tiles in bfloat16, met by bfloat16 activations: on CPUs with AMX-BF16 (Intel
#   Sapphire Rapids and later) torch's bfloat16 GEMM (oneDNN) runs 3.5-4x MKL's float32 one, and
#   GGUF prompts ran 1.4x faster (110M-shape Q4_K_M 850 -> 1228 tok/s, SmolLM2 Q4_K_M 576 -> 818);
#   with AVX512-BF16 (an AMD Zen 4) 2.3-3.2x (346-352 GFLOP/s against 107-151). Rounds the
#   activations and the products' outputs to 8 bits of mantissa: perplexity barely moves
#   (SmolLM2 Q4_K_M on benchmarks/text.txt, ctx 256: 9.6614 against float32's 9.6740), but greedy
#   answers are no longer the float32 computation's token for token (llamarun's own int8 layers
#   keep float32 tiles under it).
# llamarun's own int8/int4 layers (--quantize) take the same GEMM for int16 and int8.
# Without AVX-512 VNNI the GEMM runs on AVX2 alone, each activation one int16 (256 q1 + q2, or q1)
# met by vpmaddwd: the same integers as VNNI's, both levels at one cost. On an AMD Zen 3 (2
# threads) it ran 138-173 GOP/s for 256 x 768 by 768 x 2048 (every type) against oneDNN's 119
# GFLOP/s in float32, and 110M-shape prefill 1.15-1.2x float32 tiles' (Q4_0 687 against 567
# tok/s, Q4_K_M 666 against 578).
# One token per row keeps the one-token kernels whatever this is.
PROMPT = _prompt_choice()


def prompt_levels(x: torch.Tensor | None = None) -> int:
    """The int8 levels of a prompt's activations in the integer GEMM (2 for PROMPT int16, 1 for
    int8), or 0 where prompts take dequantized tiles (tiled_linear): PROMPT float32 or bfloat16,
    no GEMM built here, or an input x that is not float32 on the CPU or that autograd records
    (the GEMM has no backward)."""
    if PROMPT not in ("int16", "int8") or ops() is None or not _state.get("prompt_gemm"):
        return 0
    if x is not None and (
        x.dtype != torch.float32
        or x.device.type != "cpu"
        or (x.requires_grad and torch.is_grad_enabled())
    ):
        return 0
    return 2 if PROMPT == "int16" else 1


F32_GEMM_CHOICES = ("onednn", "mkl")


def _f32_gemm_choice() -> str:
    """Which GEMM multiplies float32 prompts: LLAMARUN_CPU_F32_GEMM (see F32_GEMM)."""
    return _env_choice(
        "LLAMARUN_CPU_F32_GEMM", F32_GEMM_CHOICES, "onednn", "float32 prompts take onednn"
    )


# The GEMM of float32 prompts on the CPU (float32 models' linears, and float32 tiles of quantized
# weights): "onednn" (the default), oneDNN's through torch.ops.mkldnn._linear_pointwise on the
# weights as they are; "mkl", F.linear, which is MKL's sgemm in torch's CPU builds. On an AMD Zen 5
# (2 threads) oneDNN ran 256 x 768 by 768 x 2048 at 333-381 GFLOP/s against MKL's 103-175 (MKL
# takes its AVX2 code on AMD CPUs). Its row results were also the same bit for bit for every
# prompt of 2 to 256 rows (MKL's were not); one-row products never come here (the kernels'
# f32_linear). F.linear wherever oneDNN is absent, autograd records (the op has no backward), or
# the tensors are not float32 on the CPU.
F32_GEMM = _f32_gemm_choice()


def _onednn_linear() -> Callable | None:
    if not torch.backends.mkldnn.is_available():
        return None
    return getattr(torch.ops.mkldnn, "_linear_pointwise", None)


_ONEDNN_LINEAR = _onednn_linear()


def _onednn_chosen() -> bool:
    return F32_GEMM == "onednn" and _ONEDNN_LINEAR is not None


def _f32_gemm_name() -> str:
    if _onednn_chosen():
        return "oneDNN's GEMM"
    return "torch's F.linear (MKL's sgemm in its x86 builds)"


def f32_prompt_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T (no bias) through the GEMM F32_GEMM chooses; see there."""
    if (
        _onednn_chosen()
        and x.dtype == torch.float32
        and w.dtype == torch.float32
        and x.device.type == "cpu"
        and w.device.type == "cpu"
        and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
    ):
        return _ONEDNN_LINEAR(x, w, None, "none", [], "")
    return F.linear(x, w)


def _tile_dtype() -> torch.dtype:
    return torch.bfloat16 if PROMPT == "bfloat16" else torch.float32


def _tile_buffer(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """This thread's buffer of `dtype` for dequantized tiles, at least n elements."""
    bufs = getattr(_TILES, "bufs", None)
    if bufs is None:
        bufs = _TILES.bufs = {}
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < n:
        # a normal tensor even when the first prompt runs under inference_mode (an engine's
        # step): an inference tensor could not be written outside it afterwards
        with torch.inference_mode(False):
            buf = bufs[dtype] = torch.empty(max(n, TILE_BYTES // 4), dtype=dtype, device="cpu")
    return buf


def tiled_linear(
    x: torch.Tensor,
    rows: int,
    width: int,
    fill: Callable[[int, torch.Tensor], None],
    in_features: int,
    bf16_fill: bool = True,
) -> torch.Tensor:
    """x @ W.T for a quantized W of `rows` rows of `width` (stored, padded) columns, through
    torch's GEMM in float32, or bfloat16 where PROMPT asks for it and no autograd records:
    fill(start, tile) dequantizes rows start.. into tile (n, width) of that dtype, a view of this thread's one buffer, and each
    tile is multiplied before the next overwrites it. A prompt's many tokens run at the GEMM's
    speed this way (1.5x the int8-activation kernels on 128 rows on an AMD EPYC); a fresh tile per
    product came from new pages, whose faults cost as much as the dequantization. bf16_fill=False:
    fill writes float32 only, and the product stays float32."""
    grad = x.requires_grad and torch.is_grad_enabled()
    dtype = torch.float32 if grad or not bf16_fill else _tile_dtype()
    step = max(1, TILE_BYTES // (4 * width))
    buf = _tile_buffer(min(step, rows) * width, dtype)
    xin = x.to(dtype)
    parts = []
    for start in range(0, rows, step):
        n = min(step, rows - start)
        tile = buf[: n * width].view(n, width)
        fill(start, tile)
        if grad:
            tile = tile.clone()  # autograd keeps the tile for backward: the next fill overwrites it
        parts.append(f32_prompt_linear(xin, tile[:, :in_features]).to(x.dtype))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, each row (last dim) computed alone, so a row's values do not depend on
    its batch: torch's element-wise loops run a flattened tensor's last numel % 32 values (AVX-512;
    % 16 on AVX2) through other code than its body, which rounds them differently, so a width not
    a multiple of that (stories260K's 172) made the eager forward's rows depend on their batch.
    torch's ops where there is autograd to record or the tensors are not float32 on the CPU."""
    if (
        gate.dtype != torch.float32
        or gate.device.type != "cpu"
        or (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad))
        or ops() is None
    ):
        return F.silu(gate) * up
    return torch.ops.llamarun_cpu.silu_mul(gate, up)


def _register_fakes() -> None:
    # Shapes for torch.compile tracing; the kernels themselves are opaque to it.
    @torch.library.register_fake("llamarun_cpu::int8_linear")
    def _(x, w, sw, amx=False):
        return x.new_empty((*x.shape[:-1], w.shape[0]))

    @torch.library.register_fake("llamarun_cpu::q4_linear")
    def _(x, qs, d, m):
        return x.new_empty((*x.shape[:-1], qs.shape[0]))

    @torch.library.register_fake("llamarun_cpu::f32_linear")
    def _(x, w):
        return x.new_empty((*x.shape[:-1], w.shape[0]))

    @torch.library.register_fake("llamarun_cpu::gguf_linear")
    def _(x, w, qtype, in_features):
        return x.new_empty((*x.shape[:-1], w.shape[0]))

    @torch.library.register_fake("llamarun_cpu::gguf_prompt_linear")
    def _(x, w, qtype, in_features, levels):
        return x.new_empty((*x.shape[:-1], w.shape[0]))

    @torch.library.register_fake("llamarun_cpu::int8_prompt_linear")
    def _(x, w, sw, levels):
        return x.new_empty((*x.shape[:-1], w.shape[0]))

    @torch.library.register_fake("llamarun_cpu::q4_prompt_linear")
    def _(x, qs, d, m, levels):
        return x.new_empty((*x.shape[:-1], qs.shape[0]))

    @torch.library.register_fake("llamarun_cpu::gguf_rows")
    def _(w, qtype, width, ids):
        return ids.new_empty((*ids.shape, width), dtype=torch.float32)

    @torch.library.register_fake("llamarun_cpu::silu_mul")
    def _(gate, up):
        return torch.empty_like(gate, memory_format=torch.contiguous_format)

    @torch.library.register_fake("llamarun_cpu::q4_rows_into")
    def _(qs, d, m, start, out):
        return None

    @torch.library.register_fake("llamarun_cpu::gguf_rows_into")
    def _(w, qtype, width, start, out):
        return None
