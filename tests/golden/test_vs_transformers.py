"""Golden parity with transformers' LlamaForCausalLM (CPU, float32).

Each tiny random variant is saved by transformers itself as a Hugging Face folder, and converted
to Meta folders with 1 and 2 shards; llamarun must load every one of them to the same numbers:
prompt log-probabilities within 1e-4 and the same greedy tokens as HF generate(do_sample=False).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from tiny import tiny_hf_model, write_hf, write_meta_from_hf  # noqa: E402

import llamarun  # noqa: E402
from llamarun.sampling import SamplingParams  # noqa: E402

PROMPT_LEN = 12
GREEDY_STEPS = 24
# Meta's params.json has no head_dim field, so that variant exists only as a HF folder.
CASES = [
    (variant, fmt)
    for variant in ("mha", "gqa", "tied", "llama3", "head_dim")
    for fmt in ("hf", "meta-1", "meta-2")
    if not (variant == "head_dim" and fmt != "hf")
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Per variant: the HF model's folders, a prompt, its log-probs and greedy continuation."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            hf = tiny_hf_model(variant)
            root = tmp_path_factory.mktemp(variant)
            folders = {"hf": write_hf(hf, root / "hf")}
            if variant != "head_dim":
                folders["meta-1"] = write_meta_from_hf(hf, root / "meta1", shards=1)
                folders["meta-2"] = write_meta_from_hf(hf, root / "meta2", shards=2)
            prompt = torch.randint(
                0, hf.config.vocab_size, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1)
            )
            with torch.no_grad():
                logprobs = torch.log_softmax(hf(prompt).logits.float(), dim=-1)[0]  # (T, V)
                greedy = hf.generate(
                    prompt,
                    max_new_tokens=GREEDY_STEPS,
                    do_sample=False,
                    min_new_tokens=GREEDY_STEPS,
                )
            cache[variant] = (folders, prompt, logprobs, greedy[0, PROMPT_LEN:].tolist())
        return cache[variant]

    return get


@pytest.mark.parametrize(("variant", "fmt"), CASES)
def test_prompt_logprobs_match_transformers(reference, variant, fmt):
    folders, prompt, expected, _ = reference(variant)
    llm = llamarun.load(folders[fmt], max_seq_len=64)

    with torch.no_grad():
        logits = llm.model(prompt, torch.arange(PROMPT_LEN)[None], all_logits=True)  # (1, T, V)
    logprobs = torch.log_softmax(logits, dim=-1)[0]

    assert llm.info["format"] == fmt.split("-")[0]
    torch.testing.assert_close(logprobs, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("variant", "fmt"), CASES)
def test_greedy_tokens_match_transformers_generate(reference, variant, fmt):
    folders, prompt, _, expected = reference(variant)
    llm = llamarun.load(folders[fmt], max_seq_len=64)

    steps = llm.generate(
        [prompt[0].tolist()], SamplingParams(temperature=0, max_new_tokens=GREEDY_STEPS)
    )
    tokens = [row[0] for row in steps]

    assert len(expected) == GREEDY_STEPS
    assert tokens == expected
