"""Memory plan: will a model fit a device, worked out from ModelArgs alone before any weight is read.

Three parts, each explicit:
- weights: every parameter in the run dtype; with int8/int4, the linear layers shrink to 1 or 0.5
  byte per weight plus their scales (the output to int8 in both), while embeddings and norms stay;
- KV cache: batch x context x layers x kv_heads x head_dim x 2 (k and v) x bytes of the dtype;
- working memory: logits and sampling buffers, one prefill chunk's activations, and on a GPU a
  fixed reserve for cuBLAS/kernel workspaces (see `working_bytes`).
Free memory comes from torch.cuda.mem_get_info on CUDA and psutil's available RAM on CPU. No torch
tensors are made here; sizes are in bytes and printed in decimal GB (1e9), as model cards do.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil
import torch

from .config import ModelArgs
from .engine import PREFILL_CHUNK
from .errors import ConfigError, MemoryPlanError
from .packed import packed_bytes
from .quantize import INT4_LAYOUTS, INT8_LAYOUTS, MODES, Int4Linear, quantized_bytes
from .transcode import transcoded_bytes
from .weights import StoredTensor, block_linear_shapes, packed_label

GPU_RESERVE = 512 * 2**20  # cuBLAS workspace, kernel scratch and allocator slack on a GPU
QUANTIZE_MODES = MODES
GB = 1e9

DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


def dtype_bytes(dtype: torch.dtype) -> int:
    return DTYPE_BYTES.get(dtype, torch.empty((), dtype=dtype).element_size())


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _linear_shapes(args: ModelArgs) -> list[tuple[int, int]]:
    """(out_features, in_features) of the linears in one transformer block."""
    return list(block_linear_shapes(args).values())


def linear_bytes(
    out_features: int,
    in_features: int,
    dtype: torch.dtype,
    quantize: str | None,
    *,
    gpu: bool = False,
) -> int:
    """Bytes of one linear weight: dense in `dtype`, or as quantize.py's layer holds it (int8,
    int4, or a GGUF type kept packed); on a GPU computing in `dtype`."""
    if quantize is None:
        return out_features * in_features * dtype_bytes(dtype)
    if quantize not in INT8_LAYOUTS + INT4_LAYOUTS:
        raise MemoryPlanError(f"--quantize {quantize!r} is not a mode; choose int8, int4 or auto")
    return quantized_bytes(quantize, out_features, in_features, cuda_dtype=dtype if gpu else None)


def layer_bytes(
    args: ModelArgs, dtype: torch.dtype, quantize: str | None = None, *, gpu: bool = False
) -> int:
    """Weights of one transformer block: its seven linears plus two norms (norms stay in dtype)."""
    linears = sum(linear_bytes(o, i, dtype, quantize, gpu=gpu) for o, i in _linear_shapes(args))
    return linears + 2 * args.dim * dtype_bytes(dtype)


def outer_bytes(args: ModelArgs, dtype: torch.dtype, quantize: str | None = None) -> int:
    """Weights outside the blocks: embeddings and final norm stay in dtype. quantize_ turns the
    output linear into int8 in both modes, tied or not (a tied one then gets its own int8 copy);
    a GGUF file's untied output stays in its packed type, a tied one is the embedding itself."""
    b = dtype_bytes(dtype)
    total = (args.vocab_size * args.dim + args.dim) * b
    if quantize in QUANTIZE_MODES:
        total += linear_bytes(args.vocab_size, args.dim, dtype, "int8")
    elif not args.tie_embeddings:
        total += linear_bytes(args.vocab_size, args.dim, dtype, quantize)
    return total


def weight_bytes(
    args: ModelArgs, dtype: torch.dtype, quantize: str | None = None, *, gpu: bool = False
) -> int:
    return args.n_layers * layer_bytes(args, dtype, quantize, gpu=gpu) + outer_bytes(
        args, dtype, quantize
    )


def stored_bytes(
    stored: dict[str, StoredTensor], n_layers: int, dtype: torch.dtype, *, gpu: bool = False
) -> tuple[list[int], int]:
    """(bytes of each block, bytes outside the blocks) of a checkpoint's tensors as the loaded
    model holds them (tensor_bytes)."""
    per_layer, outer = [0] * n_layers, 0
    for name, t in stored.items():
        size = tensor_bytes(name, t, dtype, gpu=gpu, tied="output.weight" not in stored)
        if name.startswith("layers."):
            per_layer[int(name.split(".")[1])] += size
        else:
            outer += size
    return per_layer, outer


def tensor_bytes(
    name: str, t: StoredTensor, dtype: torch.dtype, *, gpu: bool = False, tied: bool = False
) -> int:
    """Bytes the loaded model holds for one stored tensor: a packed matrix in its own bytes on a
    CPU, and on a GPU in the layout it is transcoded to (the embedding stays in its blocks there,
    and a classifier `tied` to it is a transcoded copy); the others (float tensors, and types
    without a kernel, dequantized at load) in `dtype`."""
    embedding = name == "tok_embeddings.weight"
    if t.packed and gpu and not embedding:
        return transcoded_bytes(t.type, t.shape, dtype)
    if t.packed:
        size = packed_bytes(t.type, t.shape)
        return size + (transcoded_bytes(t.type, t.shape, dtype) if gpu and tied else 0)
    return math.prod(t.shape) * dtype_bytes(dtype)


def kv_cache_bytes(
    args: ModelArgs, batch: int, seq_len: int, dtype: torch.dtype, n_layers: int | None = None
) -> int:
    """batch x context x layers x kv_heads x head_dim x 2 (k and v) x bytes."""
    layers = args.n_layers if n_layers is None else n_layers
    return batch * seq_len * layers * args.n_kv_heads * args.head_dim * 2 * dtype_bytes(dtype)


def working_bytes(
    args: ModelArgs,
    batch: int,
    seq_len: int,
    dtype: torch.dtype,
    *,
    gpu: bool,
    quantize: str | None = None,
) -> int:
    """Peak memory besides weights and cache, during the prefill of one PREFILL_CHUNK:
    - logits (B, V) in dtype, their float32 copy and the sampling probabilities (float32);
    - the residual stream and a normed copy (B, T, C), plus RMSNorm's float32 copy;
    - q, k, v (B, T, H|Hkv, D) with rotary's float32 copies of q and k;
    - the cache rows read back and expanded to all heads for grouped-query attention (B, H, S, D) x 2;
    - attention scores (B, H, T, S) in float32 (SDPA's math path; fused kernels need less);
    - the feed-forward's gate, up and their product (B, T, F);
    - on a GPU, GPU_RESERVE for library workspaces and allocator slack, and with int4 the
      float32 and dtype copies of the largest weight Int4Linear dequantizes per call there."""
    b, T, S = dtype_bytes(dtype), min(PREFILL_CHUNK, seq_len), seq_len
    C, F, H, D, V = args.dim, args.hidden_dim, args.n_heads, args.head_dim, args.vocab_size
    q_kv = T * (H + 2 * args.n_kv_heads) * D
    logits = V * (b + 4 + 4)
    residual = T * C * (3 * b + 4)
    attention = q_kv * b + T * (H + args.n_kv_heads) * D * 4 + 2 * H * S * D * b + H * T * S * 4
    ffn = 3 * T * F * b
    dequantized = 0
    if gpu and quantize in INT4_LAYOUTS:
        sizes = [o * i for o, i in _linear_shapes(args) if not Int4Linear.cuda_packs(i, dtype)]
        dequantized = max(sizes, default=0) * (4 + b)
    return batch * (logits + residual + attention + ffn) + (GPU_RESERVE + dequantized if gpu else 0)


@dataclass(frozen=True)
class Option:
    """One way to run: weights in `dtype`, optionally quantized, `offload_layers` blocks on the CPU."""

    dtype: torch.dtype
    quantize: str | None
    weights: int  # bytes on the main device
    kv_cache: int
    working: int
    offload_layers: int = 0
    offloaded: int = 0  # bytes of weights + cache kept in CPU memory for the offloaded blocks

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.working

    @property
    def label(self) -> str:
        return self.quantize or dtype_name(self.dtype)


@dataclass
class Plan:
    """What a model needs on one device and what would fit; `chosen` is None when nothing fits."""

    name: str
    device: torch.device
    free: int  # bytes free on the device (available RAM on CPU)
    free_cpu: int  # available RAM, for offloaded blocks
    seq_len: int
    batch: int
    asked: Option  # the dtype/quantization asked for, all on the device
    chosen: Option | None
    n_layers: int
    fitting: list[Option] = field(default_factory=list)  # dtype/quantizations that fit, best first
    offload: Option | None = None  # the asked option with as few blocks on the CPU as needed
    shorter_seq_len: int | None = None  # a --max-seq-len at which the asked option fits

    @property
    def fits(self) -> bool:
        return self.chosen is not None

    def describe(self) -> str:
        """One paragraph: the figures and the options that would fit."""
        a, where = self.asked, device_words(self.device)
        text = (
            f"{self.name} needs {fmt_gb(a.weights)} in {a.label} plus {fmt_gb(a.kv_cache)} of KV cache "
            f"at {self.seq_len} tokens{f' x {self.batch} rows' if self.batch > 1 else ''} and "
            f"{fmt_gb(a.working)} of working memory ({fmt_gb(a.total)} in all); "
            f"{where} has {fmt_gb(self.free)} free."
        )
        ways = [
            f"--quantize {o.quantize} ({fmt_gb(o.total)})"
            for o in self.fitting
            if o.quantize != a.quantize
        ]
        if self.offload is not None:
            ways.append(
                f"by offloading {self.offload.offload_layers} of {self.n_layers} layers to the CPU (--offload)"
            )
        if self.shorter_seq_len:
            ways.append(f"with --max-seq-len {self.shorter_seq_len}")
        if ways:
            ways[0] = ways[0].replace("--quantize", "with --quantize", 1)
            text += (
                " It fits "
                + (ways[0] if len(ways) == 1 else ", ".join(ways[:-1]) + " or " + ways[-1])
                + "."
            )
        else:
            text += f" Nothing fits: free memory on {where}, or use a smaller model."
        return text


def device_words(device: torch.device) -> str:
    if device.type == "cpu":
        return "this machine's RAM"
    if device.type == "mps":
        return "this Mac's GPU"
    return "this GPU"


def fmt_gb(n: int) -> str:
    """Bytes in decimal units: GB from 1 GB up, MB below, kB for the smallest."""
    if n >= GB:
        return f"{n / GB:.1f} GB"
    if n >= 1e6:
        return f"{n / 1e6:.0f} MB"
    return f"{n / 1e3:.0f} kB"


def free_memory(device: torch.device) -> int:
    """Bytes the device can still allocate: CUDA's free memory, or available RAM on CPU and MPS."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    available = psutil.virtual_memory().available
    if device.type == "mps" and hasattr(torch.mps, "recommended_max_memory"):
        return min(
            available, torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
        )
    return available


def option(
    args: ModelArgs,
    dtype: torch.dtype,
    quantize: str | None,
    batch: int,
    seq_len: int,
    *,
    gpu: bool,
    offload_layers: int = 0,
    kv_dtype: torch.dtype | None = None,
    stored: dict[str, StoredTensor] | None = None,
) -> Option:
    """kv_dtype: the KV cache's dtype when it differs from the weights' (--kv-cache-dtype).
    stored: a checkpoint's tensor table (GGUF files with packed matrices): weights counted as it
    holds them, and `quantize` is only the option's label."""
    on_device = args.n_layers - offload_layers
    kv = kv_dtype or dtype
    if stored is not None:
        layers, outer = stored_bytes(stored, args.n_layers, dtype, gpu=gpu)
        weights = sum(layers[:on_device]) + outer
        offloaded = sum(stored_bytes(stored, args.n_layers, dtype)[0][on_device:])
    else:
        weights = on_device * layer_bytes(args, dtype, quantize, gpu=gpu)
        weights += outer_bytes(args, dtype, quantize)
        offloaded = offload_layers * layer_bytes(
            args, dtype, quantize
        )  # on the CPU: no CUDA copies
    return Option(
        dtype=dtype,
        quantize=quantize,
        weights=weights,
        kv_cache=kv_cache_bytes(args, batch, seq_len, kv, on_device),
        working=working_bytes(args, batch, seq_len, dtype, gpu=gpu, quantize=quantize),
        offload_layers=offload_layers,
        offloaded=offloaded + kv_cache_bytes(args, batch, seq_len, kv, offload_layers),
    )


def plan_memory(
    args: ModelArgs,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    quantize: str | None = None,
    batch: int = 1,
    seq_len: int = 2048,
    offload: bool = False,
    name: str = "This model",
    free: int | None = None,
    free_cpu: int | None = None,
    memory: Callable[[torch.device], int] | None = None,
    stored: dict[str, StoredTensor] | None = None,
    kv_dtype: torch.dtype | None = None,
) -> Plan:
    """Pick how to run: `quantize` None/"int8"/"int4" as asked, or "auto" for the best quality that
    fits (dtype, then int8, then int4); with `offload`, blocks that do not fit go to the CPU.
    `stored`: the tensor table of a file whose matrices stay packed in their GGUF blocks; then
    that is the only option, labelled by its block types. `free`/`free_cpu` (bytes) or
    `memory(device)` stand in for the real probes in tests."""
    packed = packed_label(stored) if stored is not None else None
    device = torch.device(device)
    gpu = device.type != "cpu"
    memory = memory or free_memory  # looked up at call time so tests can stand in for it
    free = memory(device) if free is None else free
    if free_cpu is None:
        free_cpu = free if not gpu else memory(torch.device("cpu"))
    if quantize not in (None, "auto", *QUANTIZE_MODES) and packed is None:
        raise MemoryPlanError(f"--quantize {quantize!r} is not a mode; choose int8, int4 or auto")

    def make(q: str | None, offload_layers: int = 0) -> Option:
        return option(
            args,
            dtype,
            q,
            batch,
            seq_len,
            gpu=gpu,
            offload_layers=offload_layers,
            kv_dtype=kv_dtype,
            stored=stored if q is not None and q == packed else None,
        )

    if packed is not None:
        quantize = packed  # already quantized in the file: no other option to offer
    candidates = [make(q) for q in ((packed,) if packed else (None, *QUANTIZE_MODES))]
    fitting = [o for o in candidates if o.total <= free]
    asked = candidates[0] if quantize in (None, "auto") else make(quantize)
    off = fewest_offloaded(args, make, asked.quantize, free, free_cpu) if gpu else None
    if quantize == "auto":
        chosen = (
            fitting[0]
            if fitting
            else (fewest_offloaded(args, make, "int4", free, free_cpu) if offload and gpu else None)
        )
    else:
        chosen = asked if asked.total <= free else (off if offload else None)
    shorter = next(
        (
            s
            for s in _halvings(seq_len)
            if option(
                args,
                dtype,
                asked.quantize,
                batch,
                s,
                gpu=gpu,
                kv_dtype=kv_dtype,
                stored=stored if packed is not None else None,
            ).total
            <= free
        ),
        None,
    )
    return Plan(
        name,
        device,
        free,
        free_cpu,
        seq_len,
        batch,
        asked,
        chosen,
        args.n_layers,
        fitting,
        off if off is not None and off.offload_layers else None,
        shorter if asked.total > free else None,
    )


def _halvings(seq_len: int) -> list[int]:
    """Shorter contexts worth suggesting: seq_len/2, /4, ... down to 256 tokens."""
    out, s = [], seq_len // 2
    while s >= 256:
        out.append(s)
        s //= 2
    return out


def fewest_offloaded(
    args: ModelArgs, make: Callable[..., Option], quantize: str | None, free: int, free_cpu: int
) -> Option | None:
    """The option with the fewest blocks on the CPU whose device part fits `free` and whose CPU
    part fits `free_cpu`; None when even all blocks on the CPU leave too little on the device."""
    for n in range(args.n_layers + 1):
        o = make(quantize, n)
        if o.total <= free:
            return o if o.offloaded <= free_cpu else None
    return None


def check_fits(plan: Plan) -> Option:
    """The option to load with, or MemoryPlanError with the figures and what would fit."""
    if plan.chosen is None:
        raise MemoryPlanError(plan.describe())
    return plan.chosen


def plan_load(
    args: ModelArgs,
    *,
    device: torch.device,
    dtype: torch.dtype,
    quantize: str | None,
    batch: int,
    seq_len: int,
    offload: bool = False,
    offload_layers: int | None = None,
    stored: dict[str, StoredTensor] | None = None,
    name: str = "This model",
    memory: Callable[[torch.device], int] | None = None,
    kv_dtype: torch.dtype | None = None,
) -> Option:
    """The option `llamarun.load` runs with, or MemoryPlanError before any weight is read.
    `offload_layers` forces that many blocks onto the CPU (implies offload), checked against memory."""
    if offload_layers is not None and not (
        isinstance(offload_layers, int) and 0 <= offload_layers <= args.n_layers
    ):
        raise ConfigError(
            f"offload_layers must be an integer from 0 to n_layers ({args.n_layers}), got {offload_layers!r}"
        )
    plan = plan_memory(
        args,
        device=device,
        dtype=dtype,
        quantize=quantize,
        batch=batch,
        seq_len=seq_len,
        offload=offload or offload_layers is not None,
        name=name,
        memory=memory,
        stored=stored,
        kv_dtype=kv_dtype,
    )
    if offload_layers is None:
        return check_fits(plan)
    mode = (
        plan.chosen.quantize
        if plan.chosen is not None and quantize == "auto"
        else plan.asked.quantize
    )
    forced = option(
        args,
        dtype,
        mode,
        batch,
        seq_len,
        gpu=device.type != "cpu",
        offload_layers=offload_layers,
        kv_dtype=kv_dtype,
        stored=stored,
    )
    on_cpu = device.type == "cpu"  # both parts then share the same RAM
    if forced.total + (forced.offloaded if on_cpu else 0) > plan.free or (
        not on_cpu and forced.offloaded > plan.free_cpu
    ):
        raise MemoryPlanError(
            f"{plan.describe()} With {offload_layers} layers offloaded it needs {fmt_gb(forced.total)} on "
            f"{device_words(device)} and {fmt_gb(forced.offloaded)} of CPU memory."
        )
    return forced
