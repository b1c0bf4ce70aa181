"""CPU decode/prefill benchmark: llamarun against llama.cpp's own native binaries, side by side.

The peer is llama.cpp's `llama-bench` (prefill pp256, decode tg128 from an empty context) and
`llama-completion` (load time, peak RSS), built by ../shared/tools/build_llamacpp.sh DIR (never
in CI): `python benchmarks/cpu_decode.py --llamacpp DIR/bin`. llamarun runs `llamarun bench`
twice under `/usr/bin/time` for its peak RSS, measuring what llama-bench does: prefill of 256
tokens, and 128 greedy decode steps from an empty context.

Files: random models of tinyllamas shapes, or TinyLlama-1.1B's (--shapes 1B), (untied classifier,
Llama 2 vocabulary) written as GGUF
f32, Q8_0, Q4_0 with gguf-py, and Q4_K_M (or the --mixes given) made from the f32 file with
`llama-quantize`; the shared SmolLM2-135M-Instruct Q4_1 and Q4_K_M files. Rows `f32 --quantize int8 / Q8_0` and `--quantize
int4 / Q4_0` run llamarun's own quantizers on the f32 file against llama.cpp's file of those bits
(--no-quantize-rows leaves them out). Every figure is a median over --rounds rounds that
alternate the engines, one process per run; the machine is shared, so the load average is
printed and the ratios are what to read. --write-results puts the tables in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = Path(os.environ.get("LLAMARUN_TEST_MODELS", HERE.parent.parent / "shared" / "models"))
SHAPES = {
    "15M": dict(dim=288, n_layers=6, n_heads=6, hidden_dim=768),
    "110M": dict(dim=768, n_layers=12, n_heads=12, hidden_dim=2048),
    # TinyLlama-1.1B's shape (grouped KV heads): a file whose size, not the fixed costs of the
    # tokenizer and the prompt's working memory, dominates its RSS (f32 4.4 GB, Q4_K_M 668 MB)
    "1B": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632),
}
SMOLLM2 = MODELS / "smollm2-135m-instruct"
VOCAB = 32000
PROMPT, GEN = 256, 128

sys.path.insert(0, str(HERE.parent / "tests"))  # the test suite's checkpoint writers
import tiny  # noqa: E402


def write_models(shape: str, out: Path, llamacpp: Path, mixes: list[str]) -> dict[str, Path]:
    """GGUF f32/Q8_0/Q4_0 files of one random model, and the llama-quantize `mixes` of it
    (Q4_K_M, Q5_K_M, Q3_K_M, Q2_K, ...) made from the f32 file; reused."""
    import torch

    from llamarun.config import ModelArgs
    from llamarun.model import Transformer

    paths = {q: out / f"{shape}-{q}.gguf" for q in ("f32", "Q8_0", "Q4_0", *mixes)}
    args = ModelArgs(
        **{"n_kv_heads": SHAPES[shape]["n_heads"], **SHAPES[shape]},
        vocab_size=VOCAB,
        max_seq_len=1024,
    )
    if not all(paths[q].exists() for q in ("f32", "Q8_0", "Q4_0")):
        torch.manual_seed(0)
        with torch.device("meta"):
            model = Transformer(args)
        state = {
            name: torch.ones(p.shape) if p.dim() == 1 else torch.randn(p.shape) * 0.02
            for name, p in model.state_dict().items()
        }
        for qtype in ("f32", "Q8_0", "Q4_0"):
            write_gguf(state, args, paths[qtype], qtype.upper())
    for mix in mixes:
        if not paths[mix].exists():
            quantize = [str(llamacpp / "llama-quantize"), str(paths["f32"]), str(paths[mix])]
            subprocess.run([*quantize, mix, "2"], check=True, capture_output=True)
    return paths


def write_gguf(state, args, path: Path, qtype: str) -> None:
    """GGUF with the Llama 2 vocabulary, through the test suite's writer (tests/tiny.py)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(MODELS / "llama2-tokenizer" / "tokenizer.model"))
    n = sp.vocab_size()
    types = [  # gguf token types: 1 normal, 2 unknown, 3 control, 6 byte
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


# ---------------------------------------------------------------- one run of each engine


def timed(cmd: list[str], timeout: int = 1200) -> tuple[str, str, float]:
    """stdout, stderr and the peak RSS (MB) of `cmd`, measured by /usr/bin/time."""
    proc = subprocess.run(
        ["/usr/bin/time", "-f", "MAXRSS_KB %M", *cmd],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed:\n{proc.stderr[-1500:]}")
    rss = re.findall(r"MAXRSS_KB (\d+)", proc.stderr)
    return proc.stdout, proc.stderr, int(rss[-1]) / 1024 if rss else float("nan")


def run_llamarun(path: Path, threads: int, flags: tuple[str, ...] = ()) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "llamarun",
        "bench",
        str(path),
        *flags,
        "--json",
        "--threads",
        str(threads),
    ]
    # Two runs, as llama-bench measures: prefill of PROMPT tokens (pp256), and decode of GEN tokens
    # from an empty context (tg128: positions 1..GEN). Decoding after the prompt instead (positions
    # 256..383) read up to 37% more bytes per step on the 110M shape (a float32 KV cache of 6 KB
    # per position and layer against llama.cpp's float16 one at positions 0..127).
    out, _err, rss = timed([*cmd, "--prompt-len", str(PROMPT), "--gen-len", "1"])
    pre = json.loads(out[out.index("{") :])
    out, _err, rss2 = timed([*cmd, "--prompt-len", "1", "--gen-len", str(GEN + 1)])
    dec = json.loads(out[out.index("{") :])
    return {
        "prefill": pre["prefill_tok_s"],
        "decode": dec["decode_tok_s"],
        "load_s": min(pre["load_s"], dec["load_s"]),
        "rss_mb": max(pre["peak_rss_mb"], dec["peak_rss_mb"]),  # before the bench's bandwidth probe
        # the measure: peak RSS less the KV rows (cache and saved prompt chunks)
        "rss_less_kv_mb": max(
            r["peak_rss_mb"] - r["kv_cache_mb"] - r["prefix_cache_mb"] for r in (pre, dec)
        ),
        "process_rss_mb": max(rss, rss2),
    }


def run_llamacpp(path: Path, threads: int, bin_dir: Path) -> dict:
    bench = [str(bin_dir / "llama-bench"), "-m", str(path), "-t", str(threads), "-r", "1"]
    out, _err, _rss = timed([*bench, "-p", str(PROMPT), "-n", str(GEN), "-o", "json"])
    tests = json.loads(out)
    speed = {("prefill" if t["n_prompt"] else "decode"): t["avg_ts"] for t in tests}
    # load time and peak RSS from a one-token completion with the same file
    completion = [str(bin_dir / "llama-completion"), "-m", str(path), "-t", str(threads)]
    _out, err, rss = timed([*completion, "-p", "Hello", "-n", "1", "-no-cnv", "--no-warmup"])
    load = re.search(r"load time =\s*([\d.]+) ms", err)
    return {**speed, "load_s": float(load.group(1)) / 1000 if load else float("nan"), "rss_mb": rss}


@dataclass(frozen=True)
class Row:
    """One line of the table: llamarun runs `ours` with `flags`, llama.cpp runs `theirs` (the
    same file, or for `--quantize` rows llama.cpp's file of the same bits made from that float)."""

    ours: Path
    theirs: Path
    flags: tuple[str, ...] = ()


def alternate(files: dict[str, Row], opts) -> dict[str, dict[str, list[dict]]]:
    """results[row][engine] = one dict per round, the engines alternating inside each round."""
    results: dict[str, dict[str, list[dict]]] = {
        row: {"llamarun": [], "llama.cpp": []} for row in files
    }
    for r in range(opts.rounds):
        for row, spec in files.items():
            for engine in ("llamarun", "llama.cpp"):
                try:
                    res = (
                        run_llamarun(spec.ours, opts.threads, spec.flags)
                        if engine == "llamarun"
                        else run_llamacpp(spec.theirs, opts.threads, opts.llamacpp)
                    )
                except (RuntimeError, subprocess.TimeoutExpired, ValueError, KeyError) as e:
                    print(f"  round {r + 1} {row} {engine}: FAILED {str(e)[:300]}", flush=True)
                    continue
                results[row][engine].append(res)
                print(
                    f"  round {r + 1} {row:24s} {engine:9s} decode {res['decode']:7.1f} prefill "
                    f"{res['prefill']:7.1f} tok/s  load {res['load_s']:.2f} s  RSS {res['rss_mb']:.0f} MB"
                    f"  (load average {os.getloadavg()[0]:.1f})",
                    flush=True,
                )
    return results


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs) if runs else float("nan")


def table(results, files: dict[str, Row], baseline_mb: float) -> str:
    """Markdown: per file, both engines' medians and llamarun / llama.cpp ratios."""
    lines = [
        "| file | MB | llama.cpp decode | llamarun decode | x | llama.cpp prefill | llamarun "
        "prefill | x | load s (llama.cpp / llamarun) | RSS MB (llama.cpp / llamarun) | llamarun "
        "RSS above imports / file | the same less KV rows (bound: 1.15) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row, spec in files.items():
        ours, theirs = results[row]["llamarun"], results[row]["llama.cpp"]
        size = spec.theirs.stat().st_size / 1e6  # for --quantize rows: the peer's file
        d = (median(ours, "decode"), median(theirs, "decode"))
        p = (median(ours, "prefill"), median(theirs, "prefill"))
        rss = median(ours, "rss_mb")
        mib = spec.theirs.stat().st_size / 2**20  # RSS is in MiB
        lines.append(
            f"| {row} | {size:.0f} | {d[1]:.1f} | {d[0]:.1f} | {d[0] / d[1]:.2f} | {p[1]:.1f} | "
            f"{p[0]:.1f} | {p[0] / p[1]:.2f} | {median(theirs, 'load_s'):.2f} / "
            f"{median(ours, 'load_s'):.2f} | {median(theirs, 'rss_mb'):.0f} / {rss:.0f} | "
            f"{(rss - baseline_mb) / mib:.2f} | "
            f"{(median(ours, 'rss_less_kv_mb') - baseline_mb) / mib:.2f} |"
        )
    return "\n".join(lines)


def import_baseline_mb() -> float:
    """Peak RSS of a process that imports llamarun and builds its kernels, and nothing more."""
    code = (
        "import llamarun, llamarun.cli.bench; from llamarun import cpu_kernels; cpu_kernels.ops()"
    )
    return timed([sys.executable, "-c", code])[2]


def machine() -> str:
    model = re.search(
        r"Model name:\s*(.+)", subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    )
    return f"{model.group(1).strip() if model else 'unknown CPU'}, {os.cpu_count()} cores"


def write_results(text: str) -> None:
    path = HERE / "RESULTS.md"
    old = path.read_text() if path.exists() else "# CPU benchmark results\n"
    title, _, rest = old.partition("\n")
    path.write_text(f"{title}\n\n{text}\n{rest}")


def env_prefix() -> str:
    """The llamarun settings this run inherited from the environment, as a shell prefix."""
    names = ("LLAMARUN_CPU_PROMPT_DTYPE",)
    return "".join(f"{n}={shlex.quote(os.environ[n])} " for n in names if n in os.environ)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--llamacpp", type=Path, default=Path("/tmp/llamacpp/bin"), help="llama.cpp's bin/"
    )
    p.add_argument("--shapes", default="110M,15M")
    p.add_argument(
        "--mixes",
        default="Q4_K_M",
        help="llama-quantize types made from each shape's f32 file (e.g. Q4_K_M,Q5_K_M,Q3_K_M,Q2_K)",
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", type=Path, default=Path("/tmp/llamarun-bench"), help="model files")
    p.add_argument("--write-results", action="store_true", help="prepend the tables to RESULTS.md")
    p.add_argument(
        "--no-quantize-rows",
        dest="quantize_rows",
        action="store_false",
        help="leave out `--quantize int8/int4` on the f32 file against llama.cpp's Q8_0/Q4_0",
    )
    opts = p.parse_args()
    if not (opts.llamacpp / "llama-bench").exists():
        sys.exit(f"no {opts.llamacpp}/llama-bench: build it with ../shared/tools/build_llamacpp.sh")
    opts.out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Row] = {}
    for shape in filter(None, opts.shapes.split(",")):  # --shapes "": the shared files only
        paths = write_models(shape, opts.out, opts.llamacpp, opts.mixes.split(","))
        for qtype, path in paths.items():
            files[f"{shape}-shape {qtype}"] = Row(path, path)
        if opts.quantize_rows:  # llamarun's own quantizers on the float file, against the same bits
            for mode, peer in (("int8", "Q8_0"), ("int4", "Q4_0")):
                row = f"{shape}-shape f32 --quantize {mode} / {peer}"
                files[row] = Row(paths["f32"], paths[peer], ("--quantize", mode))
    for qtype in ("Q4_K_M", "Q4_1"):
        path = SMOLLM2 / f"SmolLM2-135M-Instruct.{qtype}.gguf"
        if path.exists():
            files[f"SmolLM2-135M {qtype}"] = Row(path, path)
    started, load_before = time.strftime("%Y-%m-%d %H:%M"), os.getloadavg()
    print(f"# {machine()}, {opts.threads} threads; load average {load_before[0]:.1f}", flush=True)
    results = alternate(files, opts)
    baseline = import_baseline_mb()
    loads = f"{load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after"
    text = (
        f"## {machine()}, {opts.threads} threads, {started}\n\n"
        f"`{env_prefix()}python benchmarks/cpu_decode.py {shlex.join(sys.argv[1:])}`: medians of {opts.rounds} "
        f"alternating rounds; load average {loads} (a shared machine: read the ratios). Decode "
        f"tok/s: {GEN} steps from an empty context by both (llama-bench tg{GEN}; llamarun bench "
        f"--prompt-len 1 --gen-len {GEN + 1}); prefill: pp{PROMPT} and a {PROMPT}-token prompt. RSS: peak of the process "
        f"(llama-completion for llama.cpp); llamarun's imports and kernels alone take "
        f"{baseline:.0f} MB; KV rows: each run's KV cache and the prefix cache's saved "
        f"prompt chunks (`llamarun bench` reports both).\n\n"
        f"{table(results, files, baseline)}\n"
    )
    print("\n" + text)
    if opts.write_results:
        write_results(text)


if __name__ == "__main__":
    main()
