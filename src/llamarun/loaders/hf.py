"""Hugging Face checkpoints: config.json with model.safetensors, sharded safetensors with
model.safetensors.index.json, or pytorch_model*.bin.

Tensors stay memory-mapped (safetensors.safe_open; torch.load(mmap=True)). Names are mapped to
Meta's and wq/wk are permuted from HF's half-split RoPE layout back to interleaved pairs: the
inverse of transformers' convert_llama_weights_to_hf.py `permute`. Without it the model's output
is plausible for a few tokens and then diverges.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..config import ModelArgs, RopeScaling
from ..errors import CheckpointError, ConfigError
from ..sniff import describe_tokenizer_files
from ..tokenizer import find_tokenizer
from ..weights import Checkpoint, CheckpointHeader, check_weights, expected_shapes
from .files import read_json, read_state_dict

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
DROPPED = re.compile(r".*rotary_emb\.inv_freq$")  # a buffer older transformers versions saved

# HF name -> canonical (Meta) name; {i} is the layer index.
RENAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attention.wq.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attention.wk.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attention.wv.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attention.wo.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.feed_forward.w1.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.feed_forward.w3.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.feed_forward.w2.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attention_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.ffn_norm.weight",
}
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def read_header(path: Path) -> CheckpointHeader:
    """config.json alone: the architecture, the stored dtype, the tokenizer beside it."""
    config_path = path / "config.json"
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{config_path} must hold a JSON object; restore it from the original download"
        )
    stored = (
        config.get("torch_dtype") or config.get("dtype") or _safetensors_dtype(path) or "float32"
    )
    return CheckpointHeader(
        model_args(config, config_path),
        "hf",
        path,
        str(stored),
        tokenizer=describe_tokenizer_files(path),
        name=config.get("_name_or_path") or None,
        state=config,
    )


def load(source: Path | CheckpointHeader, *, lazy: bool = False) -> Checkpoint:
    """A Hugging Face Llama/Mistral folder as canonical weights; with lazy=True wq and wk stay
    in HF's layout as HalfSplitRows, permuted only for the heads a distributed rank reads."""
    header = source if isinstance(source, CheckpointHeader) else read_header(Path(source))
    path, args = header.path, header.args
    weights = to_canonical(read_weights(path), args, path, lazy=lazy)
    check_weights(args, weights, str(path), source="config.json")
    return Checkpoint(
        args=args,
        weights=weights,
        tokenizer=find_tokenizer(path, args.vocab_size, stop_ids=_stop_ids(header.state, path)),
        path=path,
        format="hf",
        chat_template=read_chat_template(path),
        dtype=weights["tok_embeddings.weight"].dtype,
    )


def _safetensors_dtype(path: Path) -> str | None:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return None
    try:
        with safe_open(files[0], framework="pt") as f:
            keys = list(f.keys())
            dtype = f.get_slice(keys[0]).get_dtype() if keys else None
    except (SafetensorError, OSError):
        return None  # a damaged file: load() names it, with the fix
    return {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(dtype)


def model_args(config: dict, config_path: Path) -> ModelArgs:
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{config_path} describes a {model_type!r} model (architectures: {config.get('architectures')}); "
            f"llamarun runs only the Llama architecture: model_type {', '.join(map(repr, SUPPORTED_MODEL_TYPES))}"
        )
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise CheckpointError(
                f"{config_path} sets {key}=true: llamarun's Llama layers have no biases, so this checkpoint cannot be run; use a bias-free Llama model"
            )
    if config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(
            f"{config_path} sets hidden_act={config['hidden_act']!r}: llamarun supports only SwiGLU with 'silu'"
        )
    required = (
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_hidden_layers",
        "vocab_size",
    )
    for key in required:
        if not isinstance(config.get(key), int):
            raise CheckpointError(
                f"{config_path} lacks an integer {key!r} (got {config.get(key)!r}); restore config.json from the original download"
            )
    rope_theta, scaling = _rope(config, config_path)
    max_seq_len = config.get("max_position_embeddings") or 2048
    if model_type == "mistral" and config.get("sliding_window"):
        # Mistral 7B v0.1 attends to a 4096-token window: up to that length full attention is exact.
        max_seq_len = min(max_seq_len, config["sliding_window"])
    try:
        return ModelArgs(
            dim=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            n_heads=config["num_attention_heads"],
            n_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
            vocab_size=config["vocab_size"],
            hidden_dim=config["intermediate_size"],
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_seq_len=max_seq_len,
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            head_dim=config.get("head_dim") or 0,
        )
    except (ConfigError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"{config_path} is not a valid model description: {e}. Restore it from the original download"
        ) from e


def _rope(config: dict, config_path: Path) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise CheckpointError(
            f"{config_path} has a malformed rope_parameters/rope_scaling ({params!r}); it must be a JSON object"
        )
    rope_theta = float(params.get("rope_theta") or config.get("rope_theta") or 10000.0)
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type == "default":
        return rope_theta, None
    if rope_type != "llama3":
        raise CheckpointError(
            f"{config_path} uses rope_type {rope_type!r}, which llamarun does not implement; supported: 'default' and 'llama3'"
        )
    try:
        scaling = RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_seq_len=int(params["original_max_position_embeddings"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"{config_path} has llama3 rope scaling without a valid {e} field; it needs factor, low_freq_factor, high_freq_factor and original_max_position_embeddings"
        ) from e
    return rope_theta, scaling


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of the folder by HF name, memory-mapped."""
    files = weight_files(path)
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights |= read_safetensors(file) if file.suffix == ".safetensors" else read_bin(file)
    return weights


def weight_files(path: Path) -> list[Path]:
    """The weight files to read, safetensors before pytorch_model*.bin: the files an index names
    (all must exist), else model.safetensors, else every *.safetensors (numbered shards complete)."""
    for index_name, single, pattern in (
        ("model.safetensors.index.json", "model.safetensors", "*.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin", "pytorch_model*.bin"),
    ):
        index_path = path / index_name
        if index_path.is_file():
            return _indexed_files(path, index_path)
        if (path / single).is_file():
            return [path / single]
        files = sorted(path.glob(pattern))
        if files:
            return _check_numbered(path, files)
    raise CheckpointError(
        f"No weights in {path}: expected model.safetensors, model-0000N-of-0000M.safetensors with model.safetensors.index.json, or pytorch_model*.bin beside config.json"
    )


def _indexed_files(path: Path, index_path: Path) -> list[Path]:
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(
            f"{index_path} has no weight_map object; restore it from the original download"
        )
    names = sorted(set(weight_map.values()))
    missing = [n for n in names if not (path / n).is_file()]
    if missing:
        raise CheckpointError(
            f"Missing shard file(s) {', '.join(missing)} in {path}: {index_path.name} lists {len(names)} files. Download the missing file(s) again."
        )
    return [path / n for n in names]


def _check_numbered(path: Path, files: list[Path]) -> list[Path]:
    # Without an index, shards named xxx-0000N-of-0000M.ext must all be there.
    for f in files:
        m = re.fullmatch(r"(.*)-(\d+)-of-(\d+)(\..+)", f.name)
        if m:
            prefix, width, total, ext = m.group(1), len(m.group(2)), int(m.group(3)), m.group(4)
            expected = [f"{prefix}-{i:0{width}d}-of-{m.group(3)}{ext}" for i in range(1, total + 1)]
            missing = [n for n in expected if not (path / n).is_file()]
            if missing:
                raise CheckpointError(
                    f"Missing shard file(s) {', '.join(missing)} in {path}; download the missing file(s) again."
                )
            return [path / n for n in expected]
    return files


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(
            f"{file} could not be read as safetensors ({_first_line(e)}); the file is truncated or corrupt, download it again"
        ) from e


def read_bin(file: Path) -> dict[str, torch.Tensor]:
    return read_state_dict(file, "a Hugging Face pytorch_model.bin")


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def canonical_name(hf_name: str) -> str | None:
    m = _LAYER.match(hf_name)
    key = _LAYER.sub("model.layers.{i}.", hf_name, count=1) if m else hf_name
    target = RENAMES.get(key)
    if target is None:
        return None
    return target.format(i=m.group(1)) if m else target


def to_canonical(
    raw: dict[str, torch.Tensor], args: ModelArgs, path: Path, *, lazy: bool = False
) -> dict[str, torch.Tensor | HalfSplitRows]:
    """Rename to Meta names and permute wq/wk back to interleaved RoPE pairs (lazy: on read)."""
    if any(name.endswith(".bias") for name in raw):
        biased = next(name for name in raw if name.endswith(".bias"))
        raise CheckpointError(
            f"{path} holds bias tensors ({biased}): llamarun's Llama layers have no biases; this is not a plain Llama checkpoint"
        )
    kept = [n for n in raw if not DROPPED.match(n)]
    unknown = [n for n in kept if canonical_name(n) is None]
    if unknown:
        raise CheckpointError(
            f"Unexpected tensor(s) in {path}: {', '.join(unknown[:5])}. Is this a Llama-architecture checkpoint?"
        )
    hf_names = {canonical_name(n): n for n in kept}
    expected = expected_shapes(args)
    missing = [_hf_name(k) for k in expected if k not in hf_names]
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise CheckpointError(
            f"Missing {len(missing)} weight(s) in {path} (Hugging Face format): {shown}. The checkpoint may be incomplete; compare the files with model.safetensors.index.json."
        )
    weights = {}
    for name, hf_name in hf_names.items():
        if name == "output.weight" and args.tie_embeddings:
            continue  # some tied checkpoints also store lm_head; transformers ignores it too
        t = raw[hf_name]
        if (
            name.endswith(("attention.wq.weight", "attention.wk.weight"))
            and tuple(t.shape) == expected[name]
        ):
            n_heads = args.n_heads if name.endswith("wq.weight") else args.n_kv_heads
            t = HalfSplitRows(t, n_heads) if lazy else unpermute(t, n_heads)
        weights[name] = t
    return weights


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF half-split rows of each head -> Meta interleaved pairs (inverse of HF's `permute`)."""
    out_features, in_features = w.shape
    half = out_features // n_heads // 2
    return w.view(n_heads, 2, half, in_features).transpose(1, 2).reshape(out_features, in_features)


@dataclass
class HalfSplitRows:
    """wq or wk as Hugging Face stores it (each head's rows half-split for rotate_half), made
    Meta's interleaved rows only for the heads a slice asks for: the permutation is per head, so
    a rank holding whole heads permutes (and copies) only its own (a LazyWeight)."""

    weight: torch.Tensor
    n_heads: int

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def sources(self) -> list[torch.Tensor]:
        return [self.weight]

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        head_dim = self.weight.shape[0] // self.n_heads
        if dim == 0 and start % head_dim == 0 and length % head_dim == 0:
            return unpermute(self.weight.narrow(0, start, length), length // head_dim)
        return unpermute(self.weight, self.n_heads).narrow(dim, start, length)


def _hf_name(canonical: str) -> str:
    for hf, meta in RENAMES.items():
        m = re.fullmatch(re.escape(meta).replace(r"\{i\}", r"(\d+)"), canonical)
        if m:
            return hf.format(i=m.group(1)) if m.groups() else hf
    return canonical


def _stop_ids(config: dict, path: Path) -> frozenset[int]:
    """eos_token_id (an int or a list) from config.json and generation_config.json."""
    ids: set[int] = set()
    sources = [config]
    gen_path = path / "generation_config.json"
    if gen_path.is_file():
        gen = read_json(gen_path)
        if isinstance(gen, dict):
            sources.append(gen)
    for source in sources:
        eos = source.get("eos_token_id")
        for value in eos if isinstance(eos, list) else [eos]:
            if isinstance(value, int):
                ids.add(value)
    return frozenset(ids)


def read_chat_template(path: Path) -> str | None:
    """chat_template.jinja, else tokenizer_config.json's chat_template (a string, or a list of
    {name, template} of which the "default" one is used)."""
    jinja_path = path / "chat_template.jinja"
    if jinja_path.is_file():
        try:
            return jinja_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(
                f"{jinja_path} could not be read as UTF-8 text ({e}); restore it from the original download"
            ) from e
    config_path = path / "tokenizer_config.json"
    if not config_path.is_file():
        return None
    config = read_json(config_path)
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None
