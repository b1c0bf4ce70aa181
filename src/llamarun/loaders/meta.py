"""Meta checkpoints: a folder with params.json and consolidated.NN.pth (any number of shards).

Shards are merged in this one process, the way llama2.c's export.py and tinygrad do it: matrices
split across model-parallel ranks are concatenated (dim 1 for wo and w2; dim 0 for the rest) and the
replicated 1-D norms are taken from shard 0. tok_embeddings is split along the model dim in Llama 2
(ParallelEmbedding) but along the vocabulary in Llama 3 (VocabParallelEmbedding); the shard's shape
says which (transformers' convert_llama_weights_to_hf does the same by model name). A single shard
stays memory-mapped.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..config import ModelArgs, RopeScaling, ffn_hidden_dim
from ..errors import CheckpointError, ConfigError
from ..sniff import describe_tokenizer_files
from ..tokenizer import Tokenizer, find_tokenizer
from ..weights import Checkpoint, CheckpointHeader, ShardedWeight, check_weights
from .files import drop_file_pages, file_mappings, read_json, read_state_dict

SHARD_NAME = re.compile(r"consolidated\.(\d+)\.pth")
CONCAT_DIM_1 = (".attention.wo.weight", ".feed_forward.w2.weight")
DROPPED = ("rope.freqs",)  # Llama 1/2 store their RoPE table; we compute it from params.json


def read_header(path: Path) -> CheckpointHeader:
    """params.json and the shapes of the memory-mapped shard 0 (only its pickle index is read)."""
    params_path = path / "params.json"
    params = read_json(params_path)
    if not isinstance(params, dict):
        raise CheckpointError(
            f"{params_path} must hold a JSON object of model parameters; restore it from the original download"
        )
    shards = find_shards(path)
    first = read_shard(shards[0])
    args = model_args(params, merged_shapes(first, len(shards)), params_path, len(shards))
    stored = str(first["tok_embeddings.weight"].dtype).removeprefix("torch.")
    # Meta's download puts tokenizer.model beside the shards or one folder up (llama-2-7b/../)
    tokenizer = describe_tokenizer_files(path) or describe_tokenizer_files(path.parent)
    return CheckpointHeader(args, "meta", path, stored, tokenizer=tokenizer, state=shards)


def load(source: Path | CheckpointHeader, *, lazy: bool = False) -> Checkpoint:
    """A Meta checkpoint folder (params.json + consolidated.NN.pth), all shards merged; with
    lazy=True the split matrices of several shards stay apart, memory-mapped, as ShardedWeight
    (a distributed rank then reads only its slice of them)."""
    header = source if isinstance(source, CheckpointHeader) else read_header(Path(source))
    path, args = header.path, header.args
    weights = shard_views(header.state) if lazy else merge_shards(header.state)
    check_weights(args, weights, str(path), source="params.json")
    return Checkpoint(
        args=args,
        weights=weights,
        tokenizer=_find_tokenizer(path, args.vocab_size),
        path=path,
        format="meta",
        dtype=weights["tok_embeddings.weight"].dtype,
    )


def find_shards(path: Path) -> list[Path]:
    """consolidated.00.pth .. consolidated.NN.pth, checked to be contiguous."""
    found = {}
    for p in path.glob("consolidated.*.pth"):
        m = SHARD_NAME.fullmatch(p.name)
        if m:
            found[int(m.group(1))] = p
    if not found:
        raise CheckpointError(
            f"No consolidated.NN.pth files in {path}: a Meta checkpoint folder holds params.json and consolidated.00.pth (and more shards for large models)"
        )
    width = max(len(SHARD_NAME.fullmatch(p.name).group(1)) for p in found.values())
    missing = [f"consolidated.{i:0{width}d}.pth" for i in range(max(found) + 1) if i not in found]
    if missing:
        raise CheckpointError(
            f"Missing shard(s) {', '.join(missing)} in {path}: found {len(found)} of {max(found) + 1} consolidated.NN.pth files. Download the missing file(s) again."
        )
    return [found[i] for i in sorted(found)]


def read_shard(shard_path: Path) -> dict[str, torch.Tensor]:
    """One consolidated.NN.pth, memory-mapped; a corrupt file becomes one CheckpointError."""
    state = read_state_dict(shard_path, "a Meta consolidated.NN.pth file")
    return {k: t for k, t in state.items() if k not in DROPPED}


def merge_shards(shard_paths: list[Path]) -> dict[str, torch.Tensor]:
    """Canonical weights from all shards. Reads one shard at a time into preallocated tensors, so
    peak memory is the model plus one shard rather than twice the model."""
    first = read_shard(shard_paths[0])
    n = len(shard_paths)
    if n == 1:
        return first
    merged: dict[str, torch.Tensor] = {}
    for name, t in first.items():
        if t.dim() == 1:
            merged[name] = t.clone()  # replicated norm: shard 0's copy
        else:
            shape = list(t.shape)
            shape[_concat_dim(name, first)] *= n
            merged[name] = torch.empty(shape, dtype=t.dtype)
    for i, shard_path in enumerate(shard_paths):
        shard = first if i == 0 else read_shard(shard_path)
        mappings = file_mappings()  # zip .pth files are memory-mapped by read_shard
        if set(shard) != set(merged):
            odd = sorted(set(shard) ^ set(merged))
            raise CheckpointError(
                f"{shard_path} does not hold the same tensors as {shard_paths[0].name} (differs in {', '.join(odd[:5])}); the shards come from different checkpoints or one is damaged"
            )
        for name, t in shard.items():
            out = merged[name]
            if t.dim() == 1:
                continue
            dim = _concat_dim(name, shard)
            size = out.shape[dim] // n
            if t.shape != out.narrow(dim, 0, size).shape:
                raise CheckpointError(
                    f"{name} in {shard_path} has shape {tuple(t.shape)}, which does not match the other shards; the shards come from different checkpoints"
                )
            out.narrow(dim, i * size, size).copy_(t)
            drop_file_pages(t, mappings)
        del shard
        first = None
    return merged


def shard_views(shard_paths: list[Path]) -> dict[str, torch.Tensor | ShardedWeight]:
    """Canonical weights over all shards without merging: each split matrix as its memory-mapped
    pieces (nothing is read), the replicated norms from shard 0; checked as merge_shards does."""
    shards = [read_shard(p) for p in shard_paths]
    if len(shards) == 1:
        return shards[0]
    first = shards[0]
    views: dict[str, torch.Tensor | ShardedWeight] = {}
    for shard_path, shard in zip(shard_paths, shards):
        if set(shard) != set(first):
            odd = sorted(set(shard) ^ set(first))
            raise CheckpointError(
                f"{shard_path} does not hold the same tensors as {shard_paths[0].name} (differs in {', '.join(odd[:5])}); the shards come from different checkpoints or one is damaged"
            )
        for name, t in shard.items():
            if t.shape != first[name].shape:
                raise CheckpointError(
                    f"{name} in {shard_path} has shape {tuple(t.shape)}, which does not match the other shards; the shards come from different checkpoints"
                )
    for name, t in first.items():
        views[name] = (
            t
            if t.dim() == 1
            else ShardedWeight([s[name] for s in shards], _concat_dim(name, first))
        )
    return views


def _concat_dim(name: str, shard: dict[str, torch.Tensor]) -> int:
    if name == "tok_embeddings.weight":
        # Llama 3 shards the vocabulary (rows keep the full model dim, norm.weight's length)
        norm = shard.get("norm.weight")
        return 0 if norm is not None and shard[name].shape[1] == norm.shape[0] else 1
    return 1 if name.endswith(CONCAT_DIM_1) else 0


def merged_shapes(shard: dict[str, torch.Tensor], n_shards: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the merged weights, from one shard (what merge_shards would produce)."""
    shapes = {}
    for name, t in shard.items():
        shape = list(t.shape)
        if len(shape) > 1:
            shape[_concat_dim(name, shard)] *= n_shards
        shapes[name] = tuple(shape)
    return shapes


def model_args(
    params: dict, shapes: dict[str, tuple[int, ...]], params_path: Path, n_shards: int
) -> ModelArgs:
    """ModelArgs from params.json, with vocab_size and hidden_dim taken from the merged weights'
    shapes (see merged_shapes)."""
    for key in ("dim", "n_layers", "n_heads"):
        if not isinstance(params.get(key), int):
            raise CheckpointError(
                f"{params_path} lacks an integer {key!r} (got {params.get(key)!r}); restore params.json from the original download"
            )
    dim = params["dim"]
    embed = shapes.get("tok_embeddings.weight")
    w1 = shapes.get("layers.0.feed_forward.w1.weight")
    if embed is None or w1 is None or len(embed) != 2 or len(w1) != 2:
        missing = (
            "tok_embeddings.weight"
            if embed is None or len(embed) != 2
            else "layers.0.feed_forward.w1.weight"
        )
        raise CheckpointError(
            f"Missing or malformed weight {missing} in {params_path.parent}; the checkpoint is incomplete, download it again"
        )
    if embed[1] != dim:
        hint = ""
        if embed[1] < dim and dim % embed[1] == 0:
            total = n_shards * dim // embed[1]
            hint = f" The weights look like {n_shards} of {total} shards: consolidated.{n_shards:02d}.pth and later are missing; download them again."
        raise CheckpointError(
            f"tok_embeddings.weight in {params_path.parent} is {embed[1]} wide but {params_path.name} says dim={dim}.{hint or ' Is params.json from a different model?'}"
        )
    vocab_size = params.get("vocab_size", -1)
    if not isinstance(vocab_size, int) or vocab_size <= 0:
        # Llama 2 writes -1 (the tokenizer decides); the embedding shows it
        vocab_size = embed[0]
    hidden_dim = w1[0]
    if "multiple_of" in params:
        try:
            implied = ffn_hidden_dim(dim, params["multiple_of"], params.get("ffn_dim_multiplier"))
        except (TypeError, ZeroDivisionError) as e:
            raise CheckpointError(
                f"{params_path} has an invalid multiple_of/ffn_dim_multiplier ({e}); restore params.json from the original download"
            ) from e
        if implied != hidden_dim:
            raise CheckpointError(
                f"layers.0.feed_forward.w1.weight in {params_path.parent} has hidden size {hidden_dim} but {params_path.name} "
                f"(dim={dim}, multiple_of={params['multiple_of']}, ffn_dim_multiplier={params.get('ffn_dim_multiplier')}) implies {implied}. Is params.json from a different model?"
            )
    scaling = None
    if params.get("use_scaled_rope"):
        scaling = RopeScaling(
            factor=float(params.get("rope_scaling_factor") or 8.0),
            low_freq_factor=float(params.get("rope_low_freq_factor") or 1.0),
            high_freq_factor=float(params.get("rope_high_freq_factor") or 4.0),
        )
    rope_theta = float(params.get("rope_theta") or 10000.0)
    # params.json does not record the context length. Meta's own defaults: Llama 3.1+ (scaled rope)
    # 131072, Llama 3 (theta 500000) 8192, otherwise Llama 2's 4096. An explicit max_seq_len wins.
    default_len = 131072 if scaling else 8192 if rope_theta >= 500000 else 4096
    try:
        return ModelArgs(
            dim=dim,
            n_layers=params["n_layers"],
            n_heads=params["n_heads"],
            n_kv_heads=params.get("n_kv_heads") or params["n_heads"],
            vocab_size=vocab_size,
            hidden_dim=hidden_dim,
            norm_eps=float(params.get("norm_eps", 1e-5)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_seq_len=int(params.get("max_seq_len") or default_len),
            tie_embeddings=False,  # Meta files always store output.weight, even for tied models
        )
    except (ConfigError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"{params_path} is not a valid model description: {e}. Restore it from the original download"
        ) from e


def _find_tokenizer(path: Path, vocab_size: int) -> Tokenizer | None:
    # Meta's download puts tokenizer.model beside the shards or one folder up (llama-2-7b/../).
    for folder in (path, path.parent):
        tokenizer = find_tokenizer(folder, vocab_size)
        if tokenizer is not None:
            return tokenizer
    return None
