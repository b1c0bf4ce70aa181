"""Batch-1 decode speed on a GPU: a Llama-2-7B-shaped model with random weights (built on the
device, nothing downloaded), 256 new tokens, in bfloat16, int8 and int4, eager and compiled, next
to transformers' `generate` on the same weights. Prints tokens/s and achieved bandwidth (bytes of
weights read per token x tokens/s), against the GPU's peak and a measured copy bandwidth.

    python benchmarks/gpu_decode.py                 # on a CUDA GPU
    python benchmarks/gpu_decode.py --tiny          # small shape on the CPU: checks the script itself

Targets (issue 7): compiled bfloat16 >= 70% of peak bandwidth; int8 >= 1.6x bfloat16; >= 3x
transformers. `compiled` is what `llamarun.load(compile=True)` gives users (the Engine's compile).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from llamarun.build import prepare
from llamarun.config import KNOWN_MODELS, ModelArgs
from llamarun.model import Transformer
from llamarun.plan import fmt_gb
from llamarun.sampling import SamplingParams

TINY = ModelArgs(
    dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=384, vocab_size=512, max_seq_len=512
)
# Peak memory bandwidth from the vendor's data sheets, bytes/s, by a substring of the device name.
PEAK_BANDWIDTH = {
    "H200": 4.8e12,
    "H100 PCIe": 2.0e12,
    "H100 NVL": 3.9e12,
    "H100": 3.35e12,  # SXM5, HBM3
    "A100-SXM4-80GB": 2.039e12,
    "A100 80GB PCIe": 1.935e12,
    "A100": 1.555e12,  # 40 GB
    "L40S": 0.864e12,
    "RTX 4090": 1.008e12,
}
PROMPT_LEN = 8


@dataclass
class Result:
    label: str  # "bfloat16", "int8", "int4", "transformers bfloat16"
    compiled: bool
    tokens_per_s: float
    bytes_per_token: int  # weights read per decoded token
    compile_s: float = 0.0

    @property
    def bandwidth(self) -> float:
        return achieved_bandwidth(self.bytes_per_token, self.tokens_per_s)


def achieved_bandwidth(bytes_per_token: int, tokens_per_s: float) -> float:
    """Bytes/s the decode loop streams from memory: every weight is read once per token."""
    return bytes_per_token * tokens_per_s


def weight_bytes_read(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every linear (in the layout its kernel reads, e.g.
    the tile-packed int4 copy on CUDA) and norm, but only one row of the embedding table."""
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            continue
        packed = getattr(module, "_cuda_packed", None)
        if packed is not None:
            total += sum(t.numel() * t.element_size() for t in packed)
            continue
        if module is model or type(module).__name__ == "KVCache":
            continue  # RoPE tables, slot ids, the KV cache: not weights
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            total += t.numel() * t.element_size()
    return total  # a tied output reads the embedding table: counted once, through output


def random_model(
    args: ModelArgs, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> Transformer:
    """Random weights made directly on `device` (std 0.02; norms 1), so no file is needed."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(args).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model.eval()


def decode_speed(model: Transformer, new_tokens: int, *, compile: bool) -> tuple[float, float]:
    """(decode tokens/s, compile seconds) for batch 1, greedy, through the LLM engine."""
    model.setup_caches(1, PROMPT_LEN + new_tokens + 8)
    llm = prepare(model, None, compile=compile)
    prompt = [list(range(1, PROMPT_LEN + 1))]
    t0 = time.perf_counter()
    list(llm.generate(prompt, SamplingParams(temperature=0, max_new_tokens=4)))  # warm-up / compile
    compile_s = time.perf_counter() - t0 if compile else 0.0
    list(llm.generate(prompt, SamplingParams(temperature=0, max_new_tokens=new_tokens)))
    return llm.last_stats.decode_tps, compile_s


def to_hf(model: Transformer):
    """transformers' LlamaForCausalLM holding the same weights (q/k rows in HF's half-split RoPE
    layout, the inverse of loaders/hf.py's permutation)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    a = model.args
    config = LlamaConfig(
        hidden_size=a.dim,
        intermediate_size=a.hidden_dim,
        num_hidden_layers=a.n_layers,
        num_attention_heads=a.n_heads,
        num_key_value_heads=a.n_kv_heads,
        vocab_size=a.vocab_size,
        max_position_embeddings=a.max_seq_len,
        rms_norm_eps=a.norm_eps,
        rope_theta=a.rope_theta,
        tie_word_embeddings=a.tie_embeddings,
        head_dim=a.head_dim,
    )
    device, dtype = model.norm.weight.device, model.norm.weight.dtype
    with torch.device(device):
        hf = LlamaForCausalLM(config).to(dtype).eval()
    hf.load_state_dict(hf_state_dict(model), strict=True)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    a = model.args
    sd = model.state_dict()
    out = {
        "model.embed_tokens.weight": sd["tok_embeddings.weight"],
        "model.norm.weight": sd["norm.weight"],
        "lm_head.weight": sd["output.weight"],
    }
    names = {
        "attention.wq": "self_attn.q_proj",
        "attention.wk": "self_attn.k_proj",
        "attention.wv": "self_attn.v_proj",
        "attention.wo": "self_attn.o_proj",
        "feed_forward.w1": "mlp.gate_proj",
        "feed_forward.w2": "mlp.down_proj",
        "feed_forward.w3": "mlp.up_proj",
        "attention_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }
    for i in range(a.n_layers):
        for ours, theirs in names.items():
            w = sd[f"layers.{i}.{ours}.weight"]
            if ours in ("attention.wq", "attention.wk"):
                w = half_split(w, a.n_heads if ours == "attention.wq" else a.n_kv_heads)
            out[f"model.layers.{i}.{theirs}.weight"] = w
    return out


def half_split(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Interleaved RoPE pairs (Meta) -> half-split rows (HF)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_speed(hf, new_tokens: int) -> float:
    device = next(hf.parameters()).device
    ids = torch.arange(1, PROMPT_LEN + 1, device=device)[None]
    kwargs = dict(do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens)
    with torch.inference_mode():
        hf.generate(ids, **(kwargs | dict(min_new_tokens=4, max_new_tokens=4)))  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        out = hf.generate(ids, **kwargs)
        _sync(device)
    return (out.shape[1] - PROMPT_LEN) / (time.perf_counter() - t0)


def check_same_weights(model: Transformer, hf, atol: float) -> float:
    """Max |logit difference| between llamarun and transformers on one prompt (raises past atol)."""
    device = model.norm.weight.device
    tokens = torch.arange(1, PROMPT_LEN + 1, device=device)[None]
    model.setup_caches(1, 64)
    with torch.inference_mode():
        ours = model(tokens, torch.arange(PROMPT_LEN, device=device)[None], all_logits=True)
        theirs = hf(tokens).logits.float()
    diff = (ours - theirs).abs().max().item()
    if diff > atol:
        raise RuntimeError(
            f"transformers' logits differ from llamarun's by {diff:.3g} (> {atol}): the weights are not the same"
        )
    return diff


def copy_bandwidth(device: torch.device, n_bytes: int = 2**30) -> float:
    """Measured device-to-device copy speed (bytes read + written per second)."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    _sync(device)
    return 2 * 10 * n_bytes / (time.perf_counter() - t0)


def peak_bandwidth(device_name: str) -> float | None:
    return next((bw for key, bw in PEAK_BANDWIDTH.items() if key in device_name), None)


def render(results: list[Result], peak: float | None) -> str:
    head = ["mode", "run", "tok/s", "weights/token", "GB/s", "% of peak", "compile s"]
    rows = [
        [
            r.label,
            "compiled" if r.compiled else "eager",
            f"{r.tokens_per_s:.1f}",
            fmt_gb(r.bytes_per_token),
            f"{r.bandwidth / 1e9:.1f}",
            f"{100 * r.bandwidth / peak:.0f}%" if peak else "-",
            f"{r.compile_s:.1f}" if r.compiled else "-",
        ]
        for r in results
    ]
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
        for line in [head, *rows]
    ]
    return "\n".join(lines)


def ratios(results: list[Result]) -> list[str]:
    """The issue's targets as measured ratios, where both sides were measured."""
    best = {}
    for r in results:
        best[r.label] = max(best.get(r.label, 0.0), r.tokens_per_s)
    dtype = next(
        (r.label for r in results if not r.label.startswith(("int", "transformers"))), None
    )
    out = []
    if dtype and "int8" in best:
        out.append(f"int8 / {dtype}: {best['int8'] / best[dtype]:.2f}x (target >= 1.6x)")
    hf = next((v for k, v in best.items() if k.startswith("transformers")), None)
    if dtype and hf:
        out.append(f"{dtype} / transformers: {best[dtype] / hf:.2f}x (target >= 3x)")
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="a small shape on the CPU in float32 (checks the script; no GPU needed)",
    )
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument(
        "--modes", default="dtype,int8,int4", help="comma-separated: dtype, int8, int4"
    )
    parser.add_argument(
        "--no-compile", action="store_true", help="eager only (compiling takes minutes)"
    )
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    opts = parser.parse_args(argv)

    if opts.tiny:
        args, device, dtype = TINY, torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA GPU (or --tiny to check the script on the CPU)")
        args, device, dtype = KNOWN_MODELS["llama-2-7b"], torch.device("cuda"), torch.bfloat16
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = peak_bandwidth(name)
    compiles = [False] if opts.no_compile or opts.tiny else [False, True]
    dtype_label = str(dtype).removeprefix("torch.")
    print(
        f"{'tiny' if opts.tiny else 'Llama-2-7B'} shape ({args.n_params():,} parameters), random weights, batch 1, "
        f"{opts.new_tokens} new tokens, on {name}"
    )
    print(f"peak bandwidth {peak / 1e12:.2f} TB/s; " if peak else "", end="")
    print(
        f"measured copy bandwidth {copy_bandwidth(device, 2**30 if device.type == 'cuda' else 2**24) / 1e9:.0f} GB/s"
    )

    base = random_model(args, device, dtype)
    results: list[Result] = []
    for mode in opts.modes.split(","):
        model = base if mode == "dtype" else copy.deepcopy(base)
        if mode != "dtype":
            from llamarun.quantize import quantize_

            quantize_(model, mode)
        for compile in compiles:
            tps, compile_s = decode_speed(model, opts.new_tokens, compile=compile)
            results.append(
                Result(
                    dtype_label if mode == "dtype" else mode,
                    compile,
                    tps,
                    weight_bytes_read(model),
                    compile_s,
                )
            )
            print(
                f"  {results[-1].label} {'compiled' if compile else 'eager'}: {tps:.1f} tok/s",
                flush=True,
            )
        if model is not base:
            del model
            gc.collect()
    if not opts.no_transformers:
        hf = to_hf(base)
        diff = check_same_weights(base, hf, atol=1e-3 if dtype == torch.float32 else 0.5)
        tps = hf_speed(hf, opts.new_tokens)
        results.append(Result(f"transformers {dtype_label}", False, tps, weight_bytes_read(base)))
        print(f"(transformers' logits match llamarun's within {diff:.2g})")
        del hf
    print()
    print(render(results, peak))
    for line in ratios(results):
        print(line)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(
                {
                    "device": name,
                    "peak_bandwidth": peak,
                    "results": [asdict(r) | {"bandwidth": r.bandwidth} for r in results],
                },
                f,
                indent=2,
            )
    return results


if __name__ == "__main__":
    main()
