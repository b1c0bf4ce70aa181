"""Writers that create real checkpoint folders in tmp_path from tiny random models.

Hugging Face folders come from transformers' own `save_pretrained` (the reference writer); Meta
folders are converted from the same weights: HF names -> Meta names and q/k rows permuted from
HF's half-split RoPE layout back to interleaved pairs, then split into model-parallel shards along
Meta's axes. transformers is imported only inside the functions that need it (it takes seconds).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llamarun.config import ModelArgs

# Tiny Llama variants: the transformers LlamaConfig keyword arguments of each.
HF_VARIANTS: dict[str, dict] = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    # Llama 3.1's constants; with theta 500000 the 8 frequencies of head_dim 16 fall in all three
    # bands (4 kept, 1 blended, 3 divided by factor), and Meta's params.json can express them.
    "llama3": dict(
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        max_position_embeddings=131072,
    ),
    "head_dim": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    # model_type "mistral": the same tensors; sliding_window=None as in Mistral v0.2 and later
    "mistral": dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=None),
}


def tiny_hf_model(
    variant: str = "gqa",
    *,
    seed: int = 0,
    dim: int = 64,
    n_layers: int = 2,
    vocab_size: int = 256,
    hidden_dim: int = 128,
    max_seq_len: int = 256,
):
    """A random float32 transformers LlamaForCausalLM; weights drawn with std 0.1 (norms around 1)
    so logits are spread out and greedy choices are not near-ties."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    fields = dict(
        hidden_size=dim,
        intermediate_size=hidden_dim,
        num_hidden_layers=n_layers,
        vocab_size=vocab_size,
        max_position_embeddings=max_seq_len,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    )
    config_class, model_class = (
        (MistralConfig, MistralForCausalLM)
        if variant == "mistral"
        else (LlamaConfig, LlamaForCausalLM)
    )
    config = config_class(**(fields | HF_VARIANTS[variant]))
    torch.manual_seed(seed)
    model = model_class(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1 if "embed" not in name else 1.0)
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens in comparisons
    return model


def write_hf(
    model, directory: Path, *, max_shard_size: str | int | None = None, bin_format: bool = False
) -> Path:
    """Save a transformers model as a Hugging Face folder: model.safetensors, sharded safetensors
    with an index (max_shard_size), or pytorch_model.bin (bin_format). A llamarun Transformer is
    converted without transformers (see meta_to_hf) and written as model.safetensors."""
    from llamarun.model import Transformer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(model, Transformer):
        hf_state = meta_to_hf(llamarun_state(model), model.args)
        return write_hf_state(hf_state, hf_config(model.args), directory)
    if bin_format:
        model.config.save_pretrained(directory)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        torch.save(state, directory / "pytorch_model.bin")
    elif max_shard_size is not None:
        model.save_pretrained(directory, max_shard_size=max_shard_size)
    else:
        model.save_pretrained(directory)
    return directory


def hf_to_meta(model) -> tuple[dict, dict[str, torch.Tensor]]:
    """(params.json dict, Meta state dict) for a transformers LlamaForCausalLM."""
    config = model.config
    n_heads, n_kv_heads = config.num_attention_heads, config.num_key_value_heads
    sd = model.state_dict()
    state = {
        "tok_embeddings.weight": sd["model.embed_tokens.weight"],
        "norm.weight": sd["model.norm.weight"],
        # Meta files always store output.weight, also for models with tied embeddings
        "output.weight": sd["lm_head.weight"],
    }
    for i in range(config.num_hidden_layers):
        hf, meta = f"model.layers.{i}.", f"layers.{i}."
        state |= {
            meta + "attention.wq.weight": interleave(sd[hf + "self_attn.q_proj.weight"], n_heads),
            meta + "attention.wk.weight": interleave(
                sd[hf + "self_attn.k_proj.weight"], n_kv_heads
            ),
            meta + "attention.wv.weight": sd[hf + "self_attn.v_proj.weight"],
            meta + "attention.wo.weight": sd[hf + "self_attn.o_proj.weight"],
            meta + "feed_forward.w1.weight": sd[hf + "mlp.gate_proj.weight"],
            meta + "feed_forward.w2.weight": sd[hf + "mlp.down_proj.weight"],
            meta + "feed_forward.w3.weight": sd[hf + "mlp.up_proj.weight"],
            meta + "attention_norm.weight": sd[hf + "input_layernorm.weight"],
            meta + "ffn_norm.weight": sd[hf + "post_attention_layernorm.weight"],
        }
    rope = config.rope_parameters or {}
    params = {
        "dim": config.hidden_size,
        "n_layers": config.num_hidden_layers,
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads,
        "vocab_size": config.vocab_size,
        "norm_eps": config.rms_norm_eps,
        "rope_theta": rope.get("rope_theta", 10000.0),
        "max_seq_len": config.max_position_embeddings,
        **ffn_params(config.hidden_size, config.intermediate_size),
    }
    if rope.get("rope_type") == "llama3":
        # Meta's params.json says only use_scaled_rope (+ an optional factor); the band edges are
        # fixed at Meta's defaults.
        fixed = (
            rope["low_freq_factor"],
            rope["high_freq_factor"],
            rope["original_max_position_embeddings"],
        )
        if fixed != (1.0, 4.0, 8192):
            raise ValueError(f"Meta's params.json cannot express llama3 rope parameters {rope}")
        params |= {"use_scaled_rope": True, "rope_scaling_factor": rope["factor"]}
    head_dim = getattr(config, "head_dim", None)
    if head_dim and head_dim != config.hidden_size // n_heads:
        raise ValueError("Meta's params.json cannot express an explicit head_dim")
    return params, state


def interleave(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF half-split q/k rows -> Meta interleaved pairs, per head (written independently of the
    loader's `unpermute`: row j of half h goes to row 2j+h)."""
    out_features, in_features = w.shape
    head_dim = out_features // n_heads
    out = torch.empty_like(w)
    for head in range(n_heads):
        block = w[head * head_dim : (head + 1) * head_dim]
        out[head * head_dim : (head + 1) * head_dim : 2] = block[: head_dim // 2]
        out[head * head_dim + 1 : (head + 1) * head_dim : 2] = block[head_dim // 2 :]
    return out


def ffn_params(dim: int, hidden_dim: int) -> dict:
    """multiple_of / ffn_dim_multiplier for which Meta's rule gives exactly `hidden_dim`."""
    base = int(2 * (4 * dim) / 3)
    if hidden_dim == base:
        return {"multiple_of": 1}
    # int(mult * base) lands on hidden_dim or just below it; rounding up to hidden_dim fixes that
    return {"multiple_of": hidden_dim, "ffn_dim_multiplier": hidden_dim / base}


def meta_params(args: ModelArgs) -> dict:
    """params.json for a llamarun ModelArgs (Llama 2 style: vocab_size -1)."""
    return {
        "dim": args.dim,
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
        "n_kv_heads": args.n_kv_heads,
        "vocab_size": -1,
        "norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        **ffn_params(args.dim, args.hidden_dim),
    }


CONCAT_DIM_1 = (".attention.wo.weight", ".feed_forward.w2.weight")


def write_meta(
    state: dict[str, torch.Tensor],
    params: dict | ModelArgs,
    directory: Path,
    *,
    shards: int = 1,
    vocab_parallel: bool = False,
) -> Path:
    """params.json + consolidated.NN.pth, matrices split in `shards` parts along Meta's axes
    (dim 1 for wo, w2; dim 0 for the others), 1-D norms replicated. tok_embeddings is split along
    the model dim as Llama 2 does, or along the vocabulary as Llama 3 does (vocab_parallel)."""
    if isinstance(params, ModelArgs):
        params = meta_params(params)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "params.json").write_text(json.dumps(params, indent=2))
    for rank in range(shards):
        part = {}
        for name, t in state.items():
            if t.dim() == 1:
                part[name] = t.clone()
            else:
                dim = 1 if name.endswith(CONCAT_DIM_1) else 0
                if name == "tok_embeddings.weight":
                    dim = 0 if vocab_parallel else 1
                part[name] = t.chunk(shards, dim=dim)[rank].clone()  # clone: save only this part
        torch.save(part, directory / f"consolidated.{rank:02d}.pth")
    return directory


def write_meta_from_hf(
    model, directory: Path, *, shards: int = 1, vocab_parallel: bool = False
) -> Path:
    params, state = hf_to_meta(model)
    return write_meta(state, params, directory, shards=shards, vocab_parallel=vocab_parallel)


def llamarun_state(model) -> dict[str, torch.Tensor]:
    """A llamarun Transformer's canonical state dict (detached copies)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# GGUF tensor names for Meta names (the inverse of loaders/gguf.py's table, written out here).
GGUF_NAMES = {
    "attention.wq": "attn_q",
    "attention.wk": "attn_k",
    "attention.wv": "attn_v",
    "attention.wo": "attn_output",
    "feed_forward.w1": "ffn_gate",
    "feed_forward.w2": "ffn_down",
    "feed_forward.w3": "ffn_up",
    "attention_norm": "attn_norm",
    "ffn_norm": "ffn_norm",
}


# byte offsets of the float16 scales in each GGUF block type (ggml-common.h)
SCALE_OFFSETS = {
    "Q4_0": (0,),
    "Q4_1": (0, 2),
    "Q5_0": (0,),
    "Q5_1": (0, 2),
    "Q8_0": (0,),
    "Q2_K": (80, 82),
    "Q3_K": (108,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
    "IQ4_NL": (0,),
    "IQ4_XS": (0,),
}


def random_blocks(qtype: str, rows: int, cols: int, seed: int = 0, scale: float = 0.01):
    """uint8 (rows, bytes per row) of random `qtype` blocks: any bytes are valid blocks once
    their float16 scales are finite, so these are random bytes with N(0, scale) scales."""
    import gguf
    import numpy as np

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for at in SCALE_OFFSETS[qtype]:
        halves = (rng.standard_normal((rows, cols // block)) * scale).astype(np.float16)
        data[..., at : at + 2] = halves.view(np.uint8).reshape(rows, cols // block, 2)
    return data.reshape(rows, -1)


def write_gguf(
    state: dict[str, torch.Tensor],
    args: ModelArgs,
    path: Path,
    *,
    qtype: str = "F32",
    arch: str = "llama",
    rope_freqs: torch.Tensor | None = None,
    tokenizer: dict | None = None,
    blocks: dict | None = None,
    block_types: dict | None = None,
) -> Path:
    """Write a Meta-named, interleaved-RoPE state dict as a GGUF file with gguf.GGUFWriter.

    Matrices are stored as `qtype` (quantized with gguf.quants.quantize), norms as F32; an absent
    output.weight means tied embeddings. `tokenizer`: extra metadata {key: value} written as is.
    `blocks`: {Meta name: uint8 array of raw `qtype` blocks} written instead of quantizing (gguf-py
    cannot quantize K-quants); `block_types`: {Meta name: type} of those blocks where it is not
    `qtype` (mixed files, like llama.cpp's Q4_K_M).
    """
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(args.n_layers)
    writer.add_context_length(args.max_seq_len)
    writer.add_embedding_length(args.dim)
    writer.add_feed_forward_length(args.hidden_dim)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.n_kv_heads)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_rope_dimension_count(args.head_dim)
    for key, value in (tokenizer or {}).items():
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_string(key, value)
    kind = gguf.GGMLQuantizationType[qtype]
    for name, tensor in state.items():
        base, suffix = name.rsplit(".", 1)
        if base.startswith("layers."):
            _, i, rest = base.split(".", 2)
            gguf_name = f"blk.{i}.{GGUF_NAMES[rest]}.{suffix}"
        else:
            gguf_name = (
                {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output"}[base]
                + "."
                + suffix
            )
        if blocks and name in blocks:
            raw = gguf.GGMLQuantizationType[(block_types or {}).get(name, qtype)]
            writer.add_tensor(gguf_name, blocks[name], raw_dtype=raw)
            continue
        array = tensor.detach().float().numpy()
        if array.ndim == 1 or qtype == "F32":
            writer.add_tensor(gguf_name, array.astype(np.float32))
        elif qtype == "F16":
            writer.add_tensor(gguf_name, array.astype(np.float16))
        elif qtype == "BF16":
            bits = tensor.detach().to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)
            writer.add_tensor(gguf_name, bits, raw_dtype=kind)  # byte shape (rows, 2 * cols)
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, kind), raw_dtype=kind)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def half_split(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta interleaved q/k rows -> HF half-split (transformers' convert_llama_weights_to_hf permute)."""
    out_features, in_features = w.shape
    return (
        w.view(n_heads, out_features // n_heads // 2, 2, in_features)
        .transpose(1, 2)
        .reshape(out_features, in_features)
    )


def meta_to_hf(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """A canonical (Meta) state dict renamed to HF names, q/k permuted to HF's half-split layout."""
    out = {
        "model.embed_tokens.weight": state["tok_embeddings.weight"],
        "model.norm.weight": state["norm.weight"],
    }
    if not args.tie_embeddings:
        out["lm_head.weight"] = state["output.weight"]
    for i in range(args.n_layers):
        hf, meta = f"model.layers.{i}.", f"layers.{i}."
        out |= {
            hf + "self_attn.q_proj.weight": half_split(
                state[meta + "attention.wq.weight"], args.n_heads
            ),
            hf + "self_attn.k_proj.weight": half_split(
                state[meta + "attention.wk.weight"], args.n_kv_heads
            ),
            hf + "self_attn.v_proj.weight": state[meta + "attention.wv.weight"],
            hf + "self_attn.o_proj.weight": state[meta + "attention.wo.weight"],
            hf + "mlp.gate_proj.weight": state[meta + "feed_forward.w1.weight"],
            hf + "mlp.down_proj.weight": state[meta + "feed_forward.w2.weight"],
            hf + "mlp.up_proj.weight": state[meta + "feed_forward.w3.weight"],
            hf + "input_layernorm.weight": state[meta + "attention_norm.weight"],
            hf + "post_attention_layernorm.weight": state[meta + "ffn_norm.weight"],
        }
    return {k: v.contiguous() for k, v in out.items()}


def hf_config(args: ModelArgs, **overrides) -> dict:
    """config.json for ModelArgs, in the transformers 5 style (rope_parameters)."""
    rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.rope_scaling is not None:
        s = args.rope_scaling
        rope = {
            "rope_type": "llama3",
            "rope_theta": args.rope_theta,
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_seq_len,
        }
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "num_hidden_layers": args.n_layers,
        "head_dim": args.head_dim,
        "rms_norm_eps": args.norm_eps,
        "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": args.tie_embeddings,
        "rope_parameters": rope,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    return config | overrides


def write_hf_state(
    hf_state: dict[str, torch.Tensor], config: dict, directory: Path, *, shards: int = 1
) -> Path:
    """config.json + model.safetensors, or `shards` model-0000N-of-0000M.safetensors files with
    model.safetensors.index.json (tensors dealt round-robin), without transformers."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    if shards == 1:
        save_file(hf_state, directory / "model.safetensors", metadata={"format": "pt"})
        return directory
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map = {key: names[i % shards] for i, key in enumerate(sorted(hf_state))}
    for name in names:
        part = {k: v for k, v in hf_state.items() if weight_map[k] == name}
        save_file(part, directory / name, metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in hf_state.values())},
        "weight_map": weight_map,
    }
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return directory
