"""load(): one straight way from a checkpoint path to a ready LLM, each stage explicit:

header (what the file is, no weights) -> memory plan (does it fit; refuses before reading a
weight) -> checkpoint (canonical weights, memory-mapped) -> model (on the meta device, weights
assigned) -> placement (device, dtype, quantization, offloaded blocks, KV cache) -> the one step
that readies a model for decoding (`prepare_`: CPU kernels, the one-call CPU step or a compiled
step) -> LLM. This is the only module that changes a model after building it, and so also the
one that builds a speculative draft (`speculator`: another checkpoint, or a quantized copy).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from . import cpu
from .device import pick_device, pick_dtype
from .draft import draft_speculator
from .engine import Decode
from .errors import CheckpointError, ConfigError, LlamarunError
from .llm import LLM
from .loaders import load_checkpoint, read_header
from .model import Transformer
from .offload import place_
from .packed import PackedEmbedding, PackedLinear
from .plan import QUANTIZE_MODES, free_memory, kv_cache_bytes, plan_load
from .prefix_cache import default_bytes
from .quantize import Int8Linear, quantize_
from .sampling import SamplingParams
from .speculate import check_speculation
from .split import Split, check_split, plan_rank
from .tokenizer import Tokenizer
from .transcode import transcode_
from .weights import Checkpoint, PackedWeight, packed_block


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
    prefix_cache_mb: float | None = None,
    amx: bool = False,
    tp: int = 1,
    pp: int = 1,
    speculate: str | None = None,
    draft: str | Path | None = None,
    speculate_k: int | None = None,
) -> LLM | None:
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
    prefix_cache_mb: MB (1e6 bytes) of saved prompt prefixes a new prompt may start from instead
    of prefilling them (prefix_cache.py), counted by the memory plan (default: as large as the
    KV cache, up to 256 MB); 0 turns prefix caching off.
    amx: on CPUs with AMX tiles (Intel Sapphire Rapids and later), run int8 products of two or
    more rows on them: faster batches, but a row's result then depends on the rows beside it,
    so with temperature 0 a request may answer differently in a batch than alone.
    tp, pp: split the model over tp x pp processes of a torchrun job (tensor parallelism inside
    each of pp pipeline stages). Rank 0 gets the LLM; on the other ranks load() runs rank 0's
    forwards until rank 0 closes its LLM (llm.close(), or rank 0's exit), then returns None.
    A split model has no prefix cache yet: the pool's copies of cache rows would run on rank 0
    only, while every rank holds a share of each row.
    speculate="lookup": speculative decoding by prompt lookup; draft: by a draft model (a
    checkpoint path with the same vocabulary), or "int4"/"int8" by a quantized copy of this model
    (self-speculation); speculate_k: draft tokens checked per forward (default: adapted to the
    acceptance rate). Output is the same as without; a prompt running alone goes faster.
    """
    check_speculation(
        speculate,
        draft,
        speculate_k,
        compile=compile,
        amx=amx,
        split=tp * pp > 1,
        offload=offload or offload_layers is not None,
    )
    if tp != 1 or pp != 1:
        if offload or offload_layers is not None or compile:
            raise ConfigError(
                f"{'--compile' if compile else '--offload'} cannot be combined with --tp/--pp yet"
            )
        if prefix_cache_mb:
            raise ConfigError(
                "--prefix-cache-mb cannot be combined with --tp/--pp yet (a split model has no "
                "prefix cache); leave it out"
            )
        return load_parallel(
            path,
            tp,
            pp,
            tokenizer=tokenizer,
            device=device,
            dtype=dtype,
            quantize=quantize,
            max_seq_len=max_seq_len,
            max_batch_size=max_batch_size,
            kv_cache_dtype=kv_cache_dtype,
        )
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
    if prefix_cache_mb is not None and (
        not isinstance(prefix_cache_mb, int | float) or not 0 <= prefix_cache_mb < float("inf")
    ):
        raise ConfigError(f"prefix_cache_mb must be a number >= 0, got {prefix_cache_mb!r}")
    header = read_header(path)  # config only: the plan runs before any weight is read
    if header.packed and quantize in QUANTIZE_MODES:
        raise ConfigError(
            f"{header.path} is already quantized ({header.packed} blocks), and its weights run as "
            f"stored: --quantize {quantize} applies to float checkpoints. Drop --quantize (or "
            "use auto), or quantize the float model instead."
        )
    seq_len = max_seq_len or min(header.args.max_seq_len, 4096)
    prefix_bytes = (
        default_bytes(kv_cache_bytes(header.args, max_batch_size, seq_len, kv_dtype))
        if prefix_cache_mb is None
        else int(prefix_cache_mb * 1e6)
    )
    run = plan_load(
        header.args,
        device=device,
        dtype=dtype,
        quantize=quantize,
        batch=max_batch_size,
        seq_len=seq_len,
        offload=offload,
        offload_layers=offload_layers,
        stored=header.tensors if header.packed else None,
        name=header.name or Path(path).name,
        kv_dtype=kv_dtype,
        prefix_cache=prefix_bytes,
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
        "stored": header.stored,  # how the file holds most weights (float32, Q4_1, ...)
        "path": str(ckpt.path),
        "load_s": time.perf_counter() - t0,
        "dtype": str(dtype).removeprefix("torch."),
        "kv_cache_dtype": str(kv_dtype).removeprefix("torch."),
    }
    llm = prepare(
        model,
        ckpt.tokenizer,
        chat_template=ckpt.chat_template,
        compile=compile,
        info=info,
        prefix_cache_bytes=prefix_bytes,
        amx=amx,
        speculate=speculate,
        draft=draft,
        speculate_k=speculate_k,
    )
    if compile:  # compile now (the first compiled decode steps), timed apart from load and decoding
        t1 = time.perf_counter()
        for _ in llm.generate([[0]], SamplingParams(temperature=0, max_new_tokens=3)):
            pass
        info["compile_s"] = time.perf_counter() - t1
    return llm


def prepare_(model: Transformer, *, compile: bool = False, amx: bool = False) -> Decode:
    """Ready a built model (caches set up) for decoding, in place, and return its fastest decode
    step. On CPU the float32 linears move onto the C++ kernels (CpuLinear shares their weights,
    so a tied classifier stays tied). The step: with `compile`, torch.compile of the static-cache
    forward ("reduce-overhead" on CUDA replays it as a CUDA graph); on CPU otherwise the whole
    step in one C++ call (CpuStep: ~3x the eager speed at batch 1, and faster than a compiled
    step, which attends the whole static cache); elsewhere the model itself. `amx`: see load()."""
    device = model.norm.weight.device
    if device.type == "cpu":
        cpu.use_cpu_kernels_(model)
    for module in model.modules():
        if isinstance(module, Int8Linear):
            module.amx = amx
    if compile:
        mode = "reduce-overhead" if device.type == "cuda" else None
        return torch.compile(model, mode=mode, dynamic=False)
    if device.type == "cpu":
        return cpu.CpuStep.build(model, amx=amx) or model
    return model


def prepare(
    model: Transformer,
    tokenizer: Tokenizer | None,
    *,
    chat_template: str | None = None,
    compile: bool = False,
    info: dict | None = None,
    prefix_cache_bytes: int | None = None,
    amx: bool = False,
    speculate: str | None = None,
    draft: str | Path | None = None,
    speculate_k: int | None = None,
) -> LLM:
    """An LLM over a Transformer you built yourself (setup_caches done): `prepare_` readies the
    model, in place, and the LLM decodes with the step it returns. amx, speculate, draft and
    speculate_k: as for `load`."""
    check_speculation(speculate, draft, speculate_k, compile=compile, amx=amx)
    decode = prepare_(model, compile=compile, amx=amx)
    spec = draft_speculator(
        model, speculate=speculate, draft=draft, k=speculate_k, load=load, prepare_=prepare_
    )
    if spec is not None and info is not None:
        info["speculate"] = spec.describe()
    return LLM(
        model,
        tokenizer,
        chat_template=chat_template,
        decode=decode,
        info=info,
        prefix_cache_bytes=prefix_cache_bytes,
        speculator=spec,
    )


def build_model(
    ckpt: Checkpoint,
    device: torch.device,
    dtype: torch.dtype,
    *,
    model: Transformer | None = None,
) -> Transformer:
    """Materialise the checkpoint's weights into a Transformer on `device` (no copy when possible).
    model: a skeleton on the meta device to fill (default: Transformer(ckpt.args)); a distributed
    rank's holds only its share (tp.shrink_, pp.keep_stage_), and so do its weights."""
    weights = dict(ckpt.weights)
    packed = {k: w for k, w in weights.items() if isinstance(w, PackedWeight)}
    for k in packed:
        del weights[k]
    if model is None:
        with torch.device("meta"):
            model = Transformer(ckpt.args)
    # a pipeline stage may hold only one of the two tied modules (pp.keep_stage_)
    tied = (
        ckpt.args.tie_embeddings
        and hasattr(model, "tok_embeddings")
        and hasattr(model, "output")
        and "output.weight" not in weights | packed
    )
    if tied and "tok_embeddings.weight" in weights:
        weights["output.weight"] = weights["tok_embeddings.weight"]
    # matrices kept in the file's blocks replace their nn.Linear / nn.Embedding before loading
    for name, weight in packed.items():
        module_name = name.removesuffix(".weight")
        parent, child = module_name.rsplit(".", 1) if "." in module_name else ("", module_name)
        if module_name == "tok_embeddings":
            layer = PackedEmbedding.from_packed(weight, dtype)
            if tied:  # the classifier reads the same bytes
                model.output = layer.tied_linear()
        else:
            layer = PackedLinear.from_packed(weight)
        setattr(model.get_submodule(parent), child, layer)
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
    if tied and "tok_embeddings.weight" not in packed:
        model.output.weight = model.tok_embeddings.weight
    return model.to(device).eval()


def _cast(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Float weights take the run dtype; .to() is a no-op (keeping the mmap) when nothing changes.
    return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)


def build_placed(
    ckpt,
    device: torch.device,
    dtype: torch.dtype,
    *,
    quantize: str | None,
    n_offload: int,
    max_batch_size: int,
    seq_len: int,
    kv_dtype: torch.dtype | None = None,
) -> Transformer:
    """The model of `ckpt` on its devices with its caches, quantized with `quantize` (int8/int4).
    When it fits whole and needs no quantizing on a GPU, weights go straight to `device`. Otherwise
    it is built on the CPU in the file's dtype (memory-mapped, no copy) and placed block by block;
    GGUF blocks that reach a GPU take the layout its kernels read there (transcode.py), one block
    at a time, so the GPU never holds more than one block in the file's layout besides."""
    packed = any(isinstance(w, PackedWeight) for w in ckpt.weights.values())
    gpu = device.type != "cpu"
    staged = n_offload > 0 or (gpu and (quantize is not None or packed))
    if not staged:
        model = build_model(ckpt, device, dtype)
        if quantize is not None:
            quantize_(model, quantize)
        model.setup_caches(max_batch_size, seq_len, kv_dtype or dtype)
        return model
    model = build_model(ckpt, torch.device("cpu"), dtype if packed else ckpt.dtype)
    model.setup_caches(max_batch_size, seq_len, kv_dtype or dtype)  # on the CPU; moved with blocks

    def ready(module: torch.nn.Module) -> None:  # once on its device: GPU layouts, quantization
        transcode_(module, dtype)
        if quantize is not None:
            quantize_(module, quantize)

    return place_(model, device, dtype, n_offload=n_offload, quantize=ready)


def load_parallel(
    path: str | Path,
    tp: int,
    pp: int,
    *,
    tokenizer: str | Path | None,
    device: str | torch.device | None,
    dtype: str | torch.dtype | None,
    quantize: str | None,
    max_seq_len: int | None,
    max_batch_size: int,
    kv_cache_dtype: str | torch.dtype | None,
) -> LLM | None:
    """`load` for a model split over the ranks of a torchrun job (see load's tp/pp). The split is
    checked against the header before the job is joined or any weight is read; each rank then
    reads only its share. Errors are raised on rank 0; the other ranks leave them to rank 0
    (distributed.follower_exit) and end with SystemExit."""
    from . import distributed  # only a --tp/--pp run imports it, or torch.distributed's groups

    try:
        split = Split(tp, pp)
        device = pick_device(device)
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be a positive integer, got {max_batch_size!r}")
        header = read_header(path)
        check_split(header.args, split, block=packed_block(header.tensors))
        world = distributed.init_world(split, device)
    except LlamarunError:
        if distributed.launch_rank() != 0:  # every rank fails the same way; rank 0 says so
            raise SystemExit(2) from None
        raise
    try:
        run, llm = _build_rank(
            world,
            header,
            split,
            tokenizer,
            dtype,
            quantize,
            max_seq_len,
            max_batch_size,
            kv_cache_dtype,
        )
    except BaseException as e:
        world.broken = e
        if world.is_driver:
            raise
        distributed.follower_exit(world, e)
    if world.is_driver:
        return llm
    distributed.follow(world, run)
    return None


def _build_rank(
    world, header, split, tokenizer, dtype, quantize, max_seq_len, max_batch_size, kv_cache_dtype
):
    """This rank's share of the model, ready to run: (its forward, the LLM on rank 0 else None)."""
    from . import distributed, pp, tp

    t0 = time.perf_counter()
    device, args = world.device, header.args
    dtype = pick_dtype(dtype, device)
    kv_dtype = (
        pick_dtype(kv_cache_dtype, device, flag="--kv-cache-dtype") if kv_cache_dtype else dtype
    )
    seq_len = max_seq_len or min(args.max_seq_len, 4096)
    chosen = plan_rank(
        args,
        split,
        world.rank,
        device=device,
        dtype=dtype,
        quantize=quantize,
        batch=max_batch_size,
        seq_len=seq_len,
        free=free_memory(device),
        sharing=world.launch.local_world_size if device.type == "cpu" else 1,
        stored=header.tensors if header.packed else None,
        kv_dtype=kv_dtype,
        name=header.name or Path(header.path).name,
    )
    mode = chosen.quantize if chosen.quantize in QUANTIZE_MODES else None
    ckpt = load_checkpoint(header, tokenizer, lazy=True)
    weights = pp.stage_weights(ckpt.weights, args, split, world.stage)
    weights = tp.shard_weights(weights, split, world.tp_rank)
    with torch.device("meta"):
        skeleton = Transformer(args)
    tp.shrink_(pp.keep_stage_(skeleton, split, world.stage), split, world.tp_rank)
    model = build_model(replace(ckpt, weights=weights), device, dtype, model=skeleton)
    del weights, ckpt.weights  # the file mappings go with the last views of them
    if device.type != "cpu":
        transcode_(model, dtype)  # GGUF blocks into the layouts the GPU's kernels take
    if mode == "int8" and split.tp > 1:
        tp.quantize_rowwise_int8_(model, world)
    if mode is not None:
        quantize_(model, mode)
    model.setup_caches(max_batch_size, seq_len, kv_dtype)
    tp.parallelize_(model, world)
    if device.type == "cpu":
        cpu.use_cpu_kernels_(model)  # the one-call CpuStep runs a whole model: not a share
    run = pp.Stage(model, world) if split.pp > 1 else model
    world.barrier()  # every rank holds its share before rank 0 sends the first batch
    if not world.is_driver:
        return run, None
    driver = distributed.Driver(world, run)
    world.driver = driver
    info = {
        "quantize": mode,
        "offload_layers": 0,
        "format": ckpt.format,
        "path": str(ckpt.path),
        "load_s": time.perf_counter() - t0,
        "dtype": str(dtype).removeprefix("torch."),
        "kv_cache_dtype": str(kv_dtype).removeprefix("torch."),
        "tp": split.tp,
        "pp": split.pp,
    }
    llm = LLM(
        model,
        ckpt.tokenizer,
        chat_template=ckpt.chat_template,
        decode=driver,
        forward=driver,
        info=info,
        prefix_cache_bytes=0,  # the pool's row copies would run on rank 0 alone (see load)
        on_close=driver.close,
    )
    return run, llm
