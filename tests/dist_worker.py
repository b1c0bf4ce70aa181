"""One rank of a test job (started by tests/test_distributed.py with torchrun's variables): loads
each case of a JSON spec with its --tp/--pp, and on rank 0 writes what the model produced, as
`run_case` computes it in one process, to a JSON file. One job runs every case, so the test pays
for starting processes once."""

from __future__ import annotations

import json
import sys

import torch

import llamarun
from llamarun.sampling import SamplingParams


def run_case(llm, prompts: list[list[int]], max_new_tokens: int) -> dict:
    """Greedy tokens and their log-probabilities for a batch of prompts of different lengths,
    through the engine's prefill and decode steps, and the log-probability of each token of the
    first prompt (a prefill returning all positions' logits)."""
    engine = llm.engine
    params = SamplingParams(temperature=0, max_new_tokens=max_new_tokens)
    rows: list[list[tuple[int, float]]] = [[] for _ in prompts]
    outs = [engine.add(i, p, params, logprobs=0) for i, p in enumerate(prompts)]
    while outs:
        for o in outs:
            rows[o.slot].append((o.token_id, o.logprob))
        outs = engine.step()
    for i in range(len(prompts)):
        engine.release(i)
    scores = [lp for lp, _ in engine.score(0, prompts[0])[1:]]
    return {
        "tokens": [[t for t, _ in r] for r in rows],
        "logprobs": [[lp for _, lp in r] for r in rows],
        "scores": scores,
    }


def main(spec_path: str, out_path: str) -> None:
    torch.set_num_threads(1)  # several ranks share this machine's few cores
    spec = json.loads(open(spec_path).read())
    results = {}
    for case in spec["cases"]:
        llm = llamarun.load(
            case["path"],
            max_batch_size=len(spec["prompts"]),
            max_seq_len=64,
            tp=case["tp"],
            pp=case["pp"],
            quantize=case.get("quantize"),
        )
        if llm is not None:  # rank 0; the other ranks ran its forwards inside load()
            results[case["name"]] = run_case(llm, spec["prompts"], spec["max_new_tokens"])
            llm.close()
    if results:
        with open(out_path, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
