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
# Meta's params.json has no head_dim field, so that variant exists only as a HF folder; the
# other HF layouts (sharded safetensors + index, pytorch_model.bin) and Mistral's model_type are
# checked on one variant each.
FORMATS = {
    "mha": ("hf", "meta-1", "meta-2"),
    "gqa": ("hf", "meta-1", "meta-2", "hf-sharded", "hf-bin"),
    "tied": ("hf", "meta-1", "meta-2"),
    "llama3": ("hf", "meta-1", "meta-2"),
    "head_dim": ("hf",),
    "mistral": ("hf",),
}
CASES = [(variant, fmt) for variant, fmts in FORMATS.items() for fmt in fmts]


def _write(hf, variant: str, fmt: str, path):
    if fmt == "hf":
        return write_hf(hf, path)
    if fmt == "hf-sharded":
        return write_hf(hf, path, max_shard_size="40KB")
    if fmt == "hf-bin":
        return write_hf(hf, path, bin_format=True)
    # Llama 3 splits the embedding along the vocabulary, Llama 2 along the model dim
    return write_meta_from_hf(hf, path, shards=int(fmt[-1]), vocab_parallel=variant == "llama3")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Per variant: the HF model's folders, a prompt, its log-probs and greedy continuation."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            hf = tiny_hf_model(variant)
            root = tmp_path_factory.mktemp(variant)
            folders = {fmt: _write(hf, variant, fmt, root / fmt) for fmt in FORMATS[variant]}
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
    if fmt == "hf-sharded":
        assert len(list(folders[fmt].glob("model-*-of-*.safetensors"))) > 1
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


def test_batch_of_different_lengths_matches_transformers_per_prompt(reference):
    folders, _, _, _ = reference("gqa")
    hf = tiny_hf_model("gqa")
    prompts = [[5, 17, 99], [42, 8, 8, 200, 7, 61, 13, 2, 150, 31], [77, 3, 250, 14, 9]]
    with torch.no_grad():
        expected = [
            hf.generate(torch.tensor([p]), max_new_tokens=GREEDY_STEPS, do_sample=False)[
                0, len(p) :
            ].tolist()
            for p in prompts
        ]
    llm = llamarun.load(folders["meta-2"], max_seq_len=64, max_batch_size=len(prompts))

    rows = list(llm.generate(prompts, SamplingParams(temperature=0, max_new_tokens=GREEDY_STEPS)))

    assert [[row[i] for row in rows] for i in range(len(prompts))] == expected
