"""The real stories260K (llama2.c legacy .bin) reproduces the README's greedy text from llama2.c's
run.c, streamed through our tokenizers, with both its tokenizers: tok512.bin and tok512.model."""

from __future__ import annotations

import pytest
import torch
from conftest import shared_model

import llamarun
from llamarun import SamplingParams

# /work/shared/models/README.md: run.c with -t 0 -n 256 -i "Once upon a time", printed with the prompt
EXPECTED = """Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw a big, red ball. She wanted to play with it, but it was too high.
Lily's mom said, "Lily, let's go to the park." Lily was sad and didn't know what to do. She said, "I want to play with your ball, but I can't find it."
Lily was sad and didn't know what to do. She said, "I'm sorry, Lily. I didn't know what to do."
Lily didn't want to help her mom, so she said, "I'm sorry, mom. I didn't know what to do." Her mom said, "Don't worry, Lily. We can help you."""
PROMPT = "Once upon a time"
STEPS = 256  # run.c's -n: forward passes at positions 0..255, each printing the token it picks


@pytest.fixture
def one_thread():
    # a 260K-parameter model gains nothing from intra-op threads, and on a busy machine each op
    # waits for the descheduled second thread (25 ms instead of 0.1 ms per attention call)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("tokenizer", ["tok512.bin", "tok512.model"])
def test_greedy_text_matches_llama2c_run(tokenizer, one_thread):
    model = shared_model("stories260K/stories260K.bin")
    llm = llamarun.load(
        model, tokenizer=shared_model(f"stories260K/{tokenizer}"), max_seq_len=STEPS
    )
    prompt = llm.encode(PROMPT)
    assert prompt == [1, 403, 407, 261, 378]  # <s> "▁Once" "▁upon" "▁a" "▁time"

    # run.c's loop forwards positions 0..STEPS-1; the last forward picks token STEPS (after BOS)
    params = SamplingParams(temperature=0, max_new_tokens=STEPS - len(prompt) + 1)
    text = PROMPT + "".join(llm.stream(prompt, params))

    assert text == EXPECTED


def test_tokenizer_beside_the_checkpoint_is_found_without_a_name():
    ckpt = llamarun.loaders.load_checkpoint(shared_model("stories260K/stories260K.bin"))

    assert ckpt.format == "llama2c"
    assert ckpt.args.vocab_size == 512 and ckpt.args.n_kv_heads == 4 and ckpt.args.tie_embeddings
    assert ckpt.tokenizer is not None and ckpt.tokenizer.vocab_size == 512
    assert ckpt.tokenizer.encode(PROMPT) == [1, 403, 407, 261, 378]
