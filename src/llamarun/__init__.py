"""llamarun: run LLaMA-family models on your own machine.

import llamarun
llm = llamarun.load("path/to/checkpoint")
print(llm.complete("Once upon a time", llamarun.SamplingParams(temperature=0)))
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .config import ModelArgs
from .errors import CheckpointError, ConfigError, LlamarunError, RequestError, TokenizerError
from .generate import LLM, Completion
from .loaders import load_checkpoint, read_header
from .model import Transformer
from .sampling import SamplingParams
from .weights import Checkpoint, PackedWeight

__all__ = [
    "LLM",
    "Llama",
    "Completion",
    "ModelArgs",
    "SamplingParams",
    "Transformer",
    "load",
    "build_model",
    "LlamarunError",
    "CheckpointError",
    "ConfigError",
    "RequestError",
    "TokenizerError",
]


def build_model(ckpt: Checkpoint, device: torch.device, dtype: torch.dtype) -> Transformer:
    """Materialise the checkpoint's weights into a Transformer on `device` (no copy when possible)."""
    weights = dict(ckpt.weights)
    packed = {k: w for k, w in weights.items() if isinstance(w, PackedWeight)}
    for k in packed:
        del weights[k]
    if (
        ckpt.args.tie_embeddings
        and "output.weight" not in weights
        and "output.weight" not in packed
    ):
        weights["output.weight"] = weights["tok_embeddings.weight"]
    with torch.device("meta"):
        model = Transformer(ckpt.args)
    for name in packed:  # quantized linears from the file replace their nn.Linear before loading
        from .quantize import linear_from_packed

        module_name = name.removesuffix(".weight")
        parent, child = module_name.rsplit(".", 1) if "." in module_name else ("", module_name)
        setattr(model.get_submodule(parent), child, linear_from_packed(packed[name], dtype))
    weights = {k: _cast(v, device, dtype) for k, v in weights.items()}
    try:
        result = model.load_state_dict(weights, strict=False, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"weights in {ckpt.path} do not fit the model: {e}") from e
    if result.unexpected_keys:
        raise CheckpointError(
            f"Unexpected weight(s) in {ckpt.path}: {', '.join(result.unexpected_keys[:5])}"
        )
    leftover = [
        n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta
    ]
    if leftover:
        raise CheckpointError(f"Missing weight(s) in {ckpt.path}: {', '.join(leftover[:5])}")
    if ckpt.args.tie_embeddings and "output.weight" not in packed:
        model.output.weight = model.tok_embeddings.weight
    return model.to(device).eval()


def _cast(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Float weights take the run dtype; .to() is a no-op (keeping the mmap) when nothing changes.
    return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)


def load(
    path: str | Path,
    *,
    tokenizer: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    quantize: str | None = None,
    max_seq_len: int | None = None,
    max_batch_size: int = 1,
    compile: bool = False,
    offload: bool = False,
    offload_layers: int | None = None,
    kv_cache_dtype: str | torch.dtype | None = None,
) -> LLM:
    """Load a checkpoint (Meta folder, Hugging Face folder, GGUF or llama2.c file) ready to generate.

    A memory plan runs first, from the config alone: if the model does not fit the device, this
    raises MemoryPlanError with the figures and the options that would fit.
    max_seq_len: tokens of context to allocate the KV cache for (default: the model's, capped at 4096).
    quantize: "int8" or "int4" weight-only quantization after loading; "auto": the best quality
    that fits (dtype, then int8, then int4).
    offload: blocks that do not fit the GPU stay on the CPU and run there (slower, but it runs);
    offload_layers forces that many of the last blocks onto the CPU.
    kv_cache_dtype: the KV cache's dtype (default: the model's); float16 halves what attention
    reads per token, which dominates long contexts and large batches (as llama.cpp's f16 cache).
    """
    from .device import pick_device, pick_dtype

    t0 = time.perf_counter()
    device = pick_device(device)
    dtype = pick_dtype(dtype, device)
    kv_dtype = (
        pick_dtype(kv_cache_dtype, device, flag="--kv-cache-dtype") if kv_cache_dtype else dtype
    )
    if not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ConfigError(f"max_batch_size must be a positive integer, got {max_batch_size!r}")
    if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len < 2):
        raise ConfigError(f"max_seq_len must be an integer >= 2, got {max_seq_len!r}")
    from .offload import build_placed
    from .plan import QUANTIZE_MODES, plan_load

    header = read_header(path)  # config only: the plan runs before any weight is read
    seq_len = max_seq_len or min(header.args.max_seq_len, 4096)
    run = plan_load(
        header.args,
        device=device,
        dtype=dtype,
        quantize=quantize,
        batch=max_batch_size,
        seq_len=seq_len,
        offload=offload,
        offload_layers=offload_layers,
        packed=header.packed,
        name=header.name or Path(path).name,
        kv_dtype=kv_dtype,
    )
    mode = next((q for q in (run.quantize, quantize) if q in QUANTIZE_MODES), None)
    ckpt = load_checkpoint(header, tokenizer)
    model = build_placed(
        ckpt,
        device,
        dtype,
        quantize=mode,
        n_offload=run.offload_layers,
        max_batch_size=max_batch_size,
        seq_len=seq_len,
        kv_dtype=kv_dtype,
    )
    info = {
        "quantize": mode,
        "offload_layers": run.offload_layers,
        "format": ckpt.format,
        "path": str(ckpt.path),
        "load_s": time.perf_counter() - t0,
        "dtype": str(dtype).removeprefix("torch."),
        "kv_cache_dtype": str(kv_dtype).removeprefix("torch."),
    }
    llm = LLM(model, ckpt.tokenizer, chat_template=ckpt.chat_template, compile=compile, info=info)
    if compile:  # compile now (the first compiled decode steps), timed apart from load and decoding
        t1 = time.perf_counter()
        for _ in llm.generate([[0]], SamplingParams(temperature=0, max_new_tokens=3)):
            pass
        info["compile_s"] = time.perf_counter() - t1
    return llm


def __getattr__(name: str):
    if name == "Llama":  # Meta-compatible face, imported lazily
        from .llama import Llama

        return Llama
    raise AttributeError(name)
