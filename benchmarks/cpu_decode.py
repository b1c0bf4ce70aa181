"""CPU decode/prefill benchmark: llamarun vs llama.cpp (llama-cpp-python) vs transformers.

Builds random models with tinyllamas shapes (untied classifier), writes them as GGUF f32/q8_0/q4_0
(gguf package, Llama 2 vocabulary from ../shared/models) and as a Hugging Face folder, then runs
the engines alternately, one subprocess per run, over --rounds rounds and prints medians and
ratios. Also: SmolLM2-135M-Instruct Q4_1 (same file in both engines), batch 16 vs 1 (110M int8)
and perplexity int8/int4 vs float32 (stories260K, SmolLM2) on benchmarks/text.txt.

llama.cpp runs from a separate environment (it compiles on install, which takes a while):
    python -m venv /tmp/bench-venv && /tmp/bench-venv/bin/pip install llama-cpp-python
    python benchmarks/cpu_decode.py --llama-python /tmp/bench-venv/bin/python
On an AMX CPU under a hypervisor its native build can die on SIGILL in ggml's AMX kernels; build
it without them (CMAKE_ARGS as in RESULTS.md: GGML_NATIVE=OFF and the AVX-512 flags on).
The machine may be shared: every figure is a median of alternating runs; compare ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = Path(os.environ.get("LLAMARUN_TEST_MODELS", HERE.parent.parent / "shared" / "models"))
SHAPES = {
    "15M": dict(dim=288, n_layers=6, n_heads=6, hidden_dim=768),
    "110M": dict(dim=768, n_layers=12, n_heads=12, hidden_dim=2048),
}
VOCAB = 32000

sys.path.insert(0, str(HERE.parent / "tests"))  # the test suite's checkpoint writers
import tiny  # noqa: E402

SMOLLM2 = MODELS / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
STORIES260K = MODELS / "stories260K" / "stories260K.bin"

# ---------------------------------------------------------------- model files


def write_models(shape: str, out: Path) -> dict[str, Path]:
    """GGUF f32/q8_0/q4_0 and an HF folder of one random model; reused when present."""
    import torch

    from llamarun.config import ModelArgs
    from llamarun.model import Transformer

    paths = {q: out / f"{shape}-{q}.gguf" for q in ("f32", "q8_0", "q4_0")}
    paths["hf"] = out / f"{shape}-hf"
    if all(p.exists() for p in paths.values()):
        return paths
    args = ModelArgs(
        **SHAPES[shape], n_kv_heads=SHAPES[shape]["n_heads"], vocab_size=VOCAB, max_seq_len=1024
    )
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(args)
    state = {}
    for name, p in model.state_dict().items():
        state[name] = torch.ones(p.shape) if p.dim() == 1 else torch.randn(p.shape) * 0.02
    for qtype, path in paths.items():
        if qtype != "hf":
            write_gguf(state, args, path, qtype.upper())
    write_hf(state, args, paths["hf"])
    return paths


def write_gguf(state, args, path: Path, qtype: str) -> None:
    """GGUF with the Llama 2 vocabulary, through the test suite's writer (tests/tiny.py)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(MODELS / "llama2-tokenizer" / "tokenizer.model"))
    n = sp.vocab_size()
    # gguf token types: 1 normal, 2 unknown, 3 control, 6 byte
    types = [
        2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
        for i in range(n)
    ]
    metadata = {
        "general.file_type": {"F32": 0, "Q8_0": 7, "Q4_0": 2}[qtype],
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i).encode() for i in range(n)],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }
    tiny.write_gguf(state, args, path, qtype=qtype, tokenizer=metadata)


def write_hf(state, args, path: Path) -> None:
    tiny.write_hf_state(tiny.meta_to_hf(state, args), tiny.hf_config(args), path)


# ---------------------------------------------------------------- engines (one subprocess each)

LLAMA_CPP = """
import json, sys, time, random
from llama_cpp import Llama
path, prompt_len, gen_len, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
t0 = time.perf_counter()
llm = Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=prompt_len + gen_len + 8, n_batch=512, verbose=False)
load_s = time.perf_counter() - t0
rng = random.Random(0)
vocab = llm.n_vocab()
llm.eval([rng.randrange(3, vocab) for _ in range(8)]); llm.eval([5] * 4); llm.reset()  # warm up
prompt = [1] + [rng.randrange(3, vocab) for _ in range(prompt_len - 1)]
t0 = time.perf_counter(); llm.eval(prompt); t1 = time.perf_counter()
for _ in range(gen_len - 1):
    llm.eval([rng.randrange(3, vocab)])
t2 = time.perf_counter()
print(json.dumps({"prefill_tok_s": prompt_len / (t1 - t0), "decode_tok_s": (gen_len - 1) / (t2 - t1), "load_s": load_s}))
"""

TRANSFORMERS = """
import json, sys, time, torch
from transformers import AutoModelForCausalLM
path, prompt_len, gen_len, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
t0 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
load_s = time.perf_counter() - t0
g = torch.Generator().manual_seed(0)
prompt = torch.randint(3, model.config.vocab_size, (1, prompt_len), generator=g)
with torch.inference_mode():
    model(prompt[:, :8], use_cache=True)  # warm up
    t0 = time.perf_counter()
    out = model(prompt, use_cache=True)
    t1 = time.perf_counter()
    past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    for _ in range(gen_len - 1):
        out = model(token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    t2 = time.perf_counter()
print(json.dumps({"prefill_tok_s": prompt_len / (t1 - t0), "decode_tok_s": (gen_len - 1) / (t2 - t1), "load_s": load_s}))
"""


def run_json(cmd: list[str], timeout: int = 900) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout[proc.stdout.index("{") :])


def llamarun_cmd(path: Path, opts: argparse.Namespace, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "llamarun",
        "bench",
        str(path),
        "--json",
        "--prompt-len",
        str(opts.prompt_len),
        "--gen-len",
        str(opts.gen_len),
        "--threads",
        str(opts.threads),
        *extra,
    ]


def engine_cmds(paths: dict[str, Path], opts: argparse.Namespace) -> dict[str, list[str]]:
    n = str(opts.threads)
    cmds = {
        "llamarun f32": llamarun_cmd(paths["f32"], opts),
        "llamarun int8": llamarun_cmd(paths["f32"], opts, "--quantize", "int8"),
        "llamarun int4": llamarun_cmd(paths["f32"], opts, "--quantize", "int4"),
        "llamarun q8_0 file": llamarun_cmd(paths["q8_0"], opts),
        "llamarun q4_0 file": llamarun_cmd(paths["q4_0"], opts),
    }
    if opts.compile:
        cmds["llamarun f32 compiled"] = llamarun_cmd(paths["f32"], opts, "--compile")
    if opts.llama_python:
        for q in ("f32", "q8_0", "q4_0"):
            cmds[f"llama.cpp {q}"] = [
                opts.llama_python,
                "-c",
                LLAMA_CPP,
                str(paths[q]),
                str(opts.prompt_len),
                str(opts.gen_len),
                n,
            ]
    if not opts.skip_transformers:
        cmds["transformers f32"] = [
            sys.executable,
            "-c",
            TRANSFORMERS,
            str(paths["hf"]),
            str(opts.prompt_len),
            str(opts.gen_len),
            n,
        ]
    return cmds


def alternate(cmds: dict[str, list[str]], rounds: int) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {name: [] for name in cmds}
    for r in range(rounds):
        for name, cmd in cmds.items():
            try:
                results[name].append(run_json(cmd))
            except (RuntimeError, subprocess.TimeoutExpired, ValueError) as e:
                print(f"  round {r + 1} {name}: FAILED {str(e)[:400]}", flush=True)
                continue
            res = results[name][-1]
            print(
                f"  round {r + 1} {name:36s} decode {res['decode_tok_s']:8.1f} tok/s  prefill {res['prefill_tok_s']:8.1f} tok/s",
                flush=True,
            )
    return results


def median(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results) if results else float("nan")


def print_table(title: str, results: dict[str, list[dict]], pairs: list[tuple[str, str]]) -> None:
    print(f"\n## {title}: medians over {max(len(v) for v in results.values())} alternating rounds")
    print(f"{'engine':36s} {'decode tok/s':>13s} {'prefill tok/s':>14s} {'GB/s':>6s}")
    for name, res in results.items():
        gbs = median(res, "decode_gbs") if res and "decode_gbs" in res[0] else float("nan")
        print(
            f"{name:36s} {median(res, 'decode_tok_s'):13.1f} {median(res, 'prefill_tok_s'):14.1f} {gbs:6.1f}"
        )
    for ours, theirs in pairs:
        if results.get(ours) and results.get(theirs):
            d = median(results[ours], "decode_tok_s") / median(results[theirs], "decode_tok_s")
            p = median(results[ours], "prefill_tok_s") / median(results[theirs], "prefill_tok_s")
            print(f"  {ours} / {theirs}: decode {d:.2f}x, prefill {p:.2f}x")


# ---------------------------------------------------------------- sections


def bench_shapes(opts) -> None:
    for shape in opts.shapes:
        paths = write_models(shape, opts.out)
        results = alternate(engine_cmds(paths, opts), opts.rounds)
        print_table(
            f"{shape} shape, batch 1, {opts.threads} threads, prompt {opts.prompt_len}, {opts.gen_len} new tokens",
            results,
            [
                ("llamarun f32", "llama.cpp f32"),
                ("llamarun int8", "llama.cpp q8_0"),
                ("llamarun q8_0 file", "llama.cpp q8_0"),
                ("llamarun int4", "llama.cpp q4_0"),
                ("llamarun q4_0 file", "llama.cpp q4_0"),
                ("llamarun f32", "transformers f32"),
                ("llamarun f32 compiled", "llama.cpp f32"),
            ],
        )


def bench_smollm2(opts) -> None:
    if not SMOLLM2.exists():
        print(f"\n(skipping SmolLM2: {SMOLLM2} not found)")
        return
    cmds = {"llamarun Q4_1 file": llamarun_cmd(SMOLLM2, opts)}
    if opts.llama_python:
        cmds["llama.cpp Q4_1"] = [
            opts.llama_python,
            "-c",
            LLAMA_CPP,
            str(SMOLLM2),
            str(opts.prompt_len),
            str(opts.gen_len),
            str(opts.threads),
        ]
    print_table(
        "SmolLM2-135M-Instruct Q4_1",
        alternate(cmds, opts.rounds),
        [("llamarun Q4_1 file", "llama.cpp Q4_1")],
    )


def bench_batch(opts) -> None:
    path = write_models("110M", opts.out)["f32"]
    # At batch 16 the float32 KV cache's reads pass the int8 weights' (about 150 MB against 110 MB
    # a step at position 128), so the float16 cache is measured too, batch 1 and 16 alike.
    cmds = {
        f"llamarun int8 {kv} cache batch {b}": llamarun_cmd(
            path, opts, "--quantize", "int8", "--batch", str(b), "--kv-cache-dtype", kv
        )
        for kv in ("float32", "float16")
        for b in (1, 16)
    }
    results = alternate(cmds, opts.rounds)
    print_table("110M int8, batch 16 vs batch 1", results, [])
    for kv in ("float32", "float16"):
        one, sixteen = (
            median(results[f"llamarun int8 {kv} cache batch {b}"], "decode_tok_s") for b in (1, 16)
        )
        print(
            f"  {kv} cache: batch 16 / batch 1 decode tokens/s: {sixteen / one:.2f}x (target >= 8x)"
        )


def perplexity_of(
    path: Path, mode: str | None, text: str, ctx: int, tokenizer: Path | None
) -> float:
    import math

    import torch

    from llamarun import build_model, prepare
    from llamarun.loaders import load_checkpoint
    from llamarun.quantize import quantize_

    ckpt = load_checkpoint(path, tokenizer)
    if ckpt.format == "gguf":  # float32 reference: the file's blocks dequantized
        from llamarun.loaders.gguf import load as load_gguf

        ckpt = load_gguf(path, keep_quantized=False)
    model = build_model(ckpt, torch.device("cpu"), torch.float32)
    if mode:
        quantize_(model, mode)
    model.setup_caches(1, ctx)
    llm = prepare(model, ckpt.tokenizer)
    nll, count, _chunks = llm.perplexity(ckpt.tokenizer.encode(text, bos=True), ctx)
    return math.exp(nll / count)


def bench_perplexity(opts) -> None:
    text = (HERE / "text.txt").read_text()
    print(f"\n## Perplexity on benchmarks/text.txt ({len(text)} characters)")
    for name, path, ctx, tok in (
        ("stories260K", STORIES260K, 128, MODELS / "stories260K" / "tok512.model"),
        ("SmolLM2 Q4_1", SMOLLM2, 256, None),
    ):
        if not path.exists():
            print(f"(skipping {name}: {path} not found)")
            continue
        base = perplexity_of(path, None, text, ctx, tok)
        line = f"{name:14s} ctx {ctx}: float32 {base:.4f}"
        for mode in ("int8", "int4"):
            ppl = perplexity_of(path, mode, text, ctx, tok)
            line += f" | {mode} {ppl:.4f} ({100 * (ppl / base - 1):+.2f}%)"
        print(line, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--sections",
        default="shapes,smollm2,batch,perplexity",
        help="comma list of: shapes, smollm2, batch, perplexity",
    )
    p.add_argument("--shapes", default="15M,110M")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument(
        "--llama-python",
        default="/tmp/bench-venv/bin/python",
        help="python with llama-cpp-python ('' to skip)",
    )
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--compile", action="store_true", help="also run llamarun with --compile")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("/tmp/llamarun-bench"),
        help="where model files are written",
    )
    opts = p.parse_args()
    opts.shapes = opts.shapes.split(",")
    opts.out.mkdir(parents=True, exist_ok=True)
    if opts.llama_python and not Path(opts.llama_python).exists():
        print(f"(no llama.cpp: {opts.llama_python} not found; see the module docstring)")
        opts.llama_python = ""
    print(
        textwrap.dedent(f"""\
        # llamarun CPU benchmark  {time.strftime("%Y-%m-%d %H:%M:%S")}
        python {" ".join(sys.argv)}
        threads {opts.threads}, load average {os.getloadavg()[0]:.1f}"""),
        flush=True,
    )
    sections = {
        "shapes": bench_shapes,
        "smollm2": bench_smollm2,
        "batch": bench_batch,
        "perplexity": bench_perplexity,
    }
    for name in opts.sections.split(","):
        sections[name](opts)


if __name__ == "__main__":
    main()
