"""Speculative decoding on CPU: decode tokens/s plain vs speculative, in the same process,
alternating, with the share of drafted tokens kept and the tokens per forward of the model.

Cases (SmolLM2-135M-Instruct from ../shared/models, or LLAMARUN_TEST_MODELS):
- copy:   the Q4_1 GGUF asked to repeat a paragraph, plain vs --speculate lookup;
- edit:   the Q4_1 GGUF asked to rename a variable in a code block, plain vs --speculate lookup;
- random: the Q4_1 GGUF continuing random tokens, sampled at temperature 1 (greedy decoding
          falls into loops that lookup finds), plain vs --speculate lookup: little to find, so
          this is the cost of trying (sampled tokens differ between runs: not compared);
- float:  the GGUF dequantized to float32, plain vs --draft int4, --draft int8 (a quantized copy
          of itself) and a draft model (the Q4_1 GGUF itself, which has the same vocabulary).
Every greedy speculative run must give the plain run's tokens; the script stops if not.

    python benchmarks/speculative.py [--rounds 3] [--new-tokens 96] [--cases copy,edit,random,float]

The machine may be shared: each figure is the median of --rounds alternating runs; compare ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

import llamarun
from llamarun.build import build_placed, prepare
from llamarun.loaders import gguf
from llamarun.sampling import SamplingParams
from llamarun.speculate import SpeculationStats

HERE = Path(__file__).resolve().parent
MODELS = Path(os.environ.get("LLAMARUN_TEST_MODELS", HERE.parent.parent / "shared" / "models"))
SMOLLM2 = MODELS / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SEQ_LEN = 1024

PARAGRAPH = (
    "The history of the lighthouse is a story of fire, glass and patience. The earliest beacons "
    "were open fires on hilltops, tended through the night by keepers who burned wood, coal and "
    "later oil. In 1822 Augustin Fresnel designed a lens of concentric glass rings that bent the "
    "light of a single lamp into a beam visible for more than twenty miles, and within a few "
    "decades his lenses stood on coasts around the world."
)
CODE = """def total_price(items, tax_rate):
    subtotal = 0
    for item in items:
        subtotal += item.price * item.quantity
    tax = subtotal * tax_rate
    discount = 0
    if subtotal > 100:
        discount = subtotal * 0.05
    return subtotal + tax - discount
"""
PROMPTS = {
    "copy": f"Repeat the following paragraph exactly, word for word:\n\n{PARAGRAPH}",
    "edit": f"Rename the variable `subtotal` to `net` in this code and print the whole code:\n\n"
    f"```python\n{CODE}```",
    "float": "Write a short story about a robot who learns to paint.",
}


def decode_run(
    llm, prompt: list[int], new_tokens: int, temperature: float = 0.0
) -> tuple[tuple[float, float], list[int], dict | None]:
    """Decode speed after the prefill (the first new token comes from it) as (tokens per wall
    second, tokens per CPU second of this process: steadier on a shared machine), the tokens,
    and the speculation figures of this run."""
    engine = llm.engine
    if engine.speculator is not None:
        engine.speculator.stats = SpeculationStats()
    stop_ids, engine.stop_ids = engine.stop_ids, frozenset()  # always new_tokens tokens
    try:
        params = SamplingParams(temperature=temperature, seed=0, max_new_tokens=new_tokens)
        tokens = [engine.add(0, prompt, params).token_id]
        t0, c0 = time.perf_counter(), time.process_time()
        while outs := engine.step():
            tokens += [o.token_id for o in outs]
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        engine.release(0)
    finally:
        engine.stop_ids = stop_ids
    n = len(tokens) - 1
    return (n / seconds, n / cpu_seconds), tokens, llm.speculation


def compare(
    name: str, llms: dict, prompt: list[int], rounds: int, new_tokens: int, temperature: float = 0.0
) -> None:
    """Alternate the LLMs (the first is plain decoding) for `rounds` rounds after a warm-up."""
    for llm in llms.values():
        decode_run(llm, prompt[:16], 4)
    speeds: dict[str, list[float]] = {k: [] for k in llms}
    cpu_speeds: dict[str, list[float]] = {k: [] for k in llms}
    figures: dict[str, dict | None] = {}
    reference = None
    for _ in range(rounds):
        for label, llm in llms.items():
            (tok_s, cpu_tok_s), tokens, spec = decode_run(llm, prompt, new_tokens, temperature)
            if reference is None:
                reference = tokens
            if temperature == 0 and tokens != reference:
                raise SystemExit(f"{name}: {label} gave other tokens than plain decoding")
            speeds[label].append(tok_s)
            cpu_speeds[label].append(cpu_tok_s)
            figures[label] = spec
    base = statistics.median(speeds["plain"])
    cpu_base = statistics.median(cpu_speeds["plain"])
    same = "greedy tokens identical" if temperature == 0 else f"sampled at {temperature}"
    print(f"\n{name}: {len(prompt)} prompt tokens, {new_tokens} new, {same}")
    for label, values in speeds.items():
        median = statistics.median(values)
        cpu = statistics.median(cpu_speeds[label])
        line = (
            f"  {label:<12} {median:6.1f} tok/s x{median / base:.2f}  "
            f"{cpu:6.1f} tok/CPU-s x{cpu / cpu_base:.2f}"
        )
        spec = figures[label]
        if spec is not None:
            line += (
                f"   {100 * spec['acceptance_rate']:3.0f}% of {spec['proposed']} drafted kept, "
                f"{spec['tokens_per_forward']:.2f} tokens/forward"
            )
        print(line + f"   (runs: {', '.join(f'{v:.1f}' for v in values)})")


def chat_ids(llm, text: str) -> list[int]:
    return llm.chat_format.encode_dialog([{"role": "user", "content": text}])


def float_llm(ckpt, **speculation):
    """The dequantized SmolLM2 in float32, ready to decode (a fresh model for each LLM)."""
    model = build_placed(
        ckpt,
        torch.device("cpu"),
        torch.float32,
        quantize=None,
        n_offload=0,
        max_batch_size=1,
        seq_len=SEQ_LEN,
        kv_dtype=torch.float32,
    )
    return prepare(model, ckpt.tokenizer, chat_template=ckpt.chat_template, **speculation)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--cases", default="copy,edit,random,float")
    args = parser.parse_args()
    cases = args.cases.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {SMOLLM2.name}")

    load = dict(max_batch_size=1, max_seq_len=SEQ_LEN)
    plain = llamarun.load(SMOLLM2, **load)
    lookup = llamarun.load(SMOLLM2, speculate="lookup", **load)
    for case in ("copy", "edit"):
        if case in cases:
            prompt = chat_ids(plain, PROMPTS[case])
            compare(case, {"plain": plain, "lookup": lookup}, prompt, args.rounds, args.new_tokens)
    if "random" in cases:
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(200, plain.model.args.vocab_size, (128,), generator=g).tolist()
        llms = {"plain": plain, "lookup": lookup}
        compare("random", llms, prompt, args.rounds, args.new_tokens, temperature=1.0)
    if "float" in cases:
        ckpt = gguf.load(SMOLLM2, keep_quantized=False)
        llms = {
            "plain": float_llm(ckpt),
            "draft int4": float_llm(ckpt, draft="int4"),
            "draft int8": float_llm(ckpt, draft="int8"),
            "draft Q4_1": float_llm(ckpt, draft=str(SMOLLM2)),
        }
        prompt = chat_ids(plain, PROMPTS["float"])
        compare("float32", llms, prompt, args.rounds, args.new_tokens)


if __name__ == "__main__":
    main()
