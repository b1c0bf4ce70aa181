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
    from transformers import LlamaConfig, LlamaForCausalLM

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
    config = LlamaConfig(**(fields | HF_VARIANTS[variant]))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float().eval()
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
    with an index (max_shard_size), or pytorch_model.bin (bin_format)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
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


CONCAT_DIM_1 = ("tok_embeddings.weight", ".attention.wo.weight", ".feed_forward.w2.weight")


def write_meta(
    state: dict[str, torch.Tensor], params: dict, directory: Path, *, shards: int = 1
) -> Path:
    """params.json + consolidated.NN.pth, matrices split in `shards` parts along Meta's axes
    (dim 1 for tok_embeddings, wo, w2; dim 0 for the others), 1-D norms replicated."""
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
                part[name] = t.chunk(shards, dim=dim)[rank].clone()  # clone: save only this part
        torch.save(part, directory / f"consolidated.{rank:02d}.pth")
    return directory


def write_meta_from_hf(model, directory: Path, *, shards: int = 1) -> Path:
    params, state = hf_to_meta(model)
    return write_meta(state, params, directory, shards=shards)


def llamarun_state(model) -> dict[str, torch.Tensor]:
    """A llamarun Transformer's canonical state dict (detached copies)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
