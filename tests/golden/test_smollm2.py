"""Golden: the real SmolLM2-135M-Instruct GGUF (Q4_1, gpt2 vocabulary, ChatML template from the
file) answers README's question like the reference: greedy, float32 from the dequantized weights.
Its Q4_K_M file (made from the Q4_1 one: Q5_0, Q8_0, Q6_K and Q4_K blocks), run in its own
bytes, answers what float32 on its dequantized weights answers."""

from __future__ import annotations

import pytest
import torch
from conftest import shared_model

import llamarun
from llamarun import build_model
from llamarun.llm import LLM
from llamarun.loaders.gguf import load
from llamarun.sampling import SamplingParams

SMOLLM2 = "smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_Q4_K_M = "smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_K_M.gguf"
# float32 on the Q4_K_M file's dequantized weights answers this (not Paris: the file is a 4-bit
# model re-quantized to 4 and 5 bits); llama.cpp's 8-bit activations answer otherwise again
Q4_K_M_ANSWER = "L'Étoile (The City of Light) is the capital of France."
# asked for one short sentence, float32, llama.cpp (llama-completion, greedy) and llamarun all
# answer Paris from the Q4_K_M file
SHORT_QUESTION = [
    {"role": "system", "content": "Answer in one short sentence."},
    {"role": "user", "content": "What is the capital of France?"},
]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ANSWER = "The capital of France is Paris."
GREEDY = SamplingParams(temperature=0, max_new_tokens=24)


def test_smollm2_dequantized_answers_paris():
    ckpt = load(shared_model(SMOLLM2), keep_quantized=False)
    model = build_model(ckpt, torch.device("cpu"), torch.float32)
    model.setup_caches(1, 256, torch.float32)
    llm = LLM(model, ckpt.tokenizer, chat_template=ckpt.chat_template)

    prompt_ids = llm.chat_format.encode_dialog(QUESTION)

    # the file's template adds its default system prompt; ids checked against transformers' reader
    assert ckpt.tokenizer.decode(prompt_ids).startswith(
        "system\nYou are a helpful AI assistant named SmolLM"
    )
    assert prompt_ids[:2] == [1, 9690] and prompt_ids[-3:] == [
        520,
        9531,
        198,
    ]  # <|im_start|> system ... assistant \n
    assert llm.chat(QUESTION, GREEDY) == ANSWER


@pytest.mark.slow  # loads the model a second time; README's path (packed Q4_1 layers)
def test_smollm2_packed_answers_paris():
    llm = llamarun.load(shared_model(SMOLLM2), device="cpu", dtype="float32", max_seq_len=256)

    assert llm.chat(QUESTION, GREEDY) == ANSWER


def test_smollm2_q4_k_m_in_its_own_bytes_answers_as_float32_does():
    llm = llamarun.load(
        shared_model(SMOLLM2_Q4_K_M), device="cpu", dtype="float32", max_seq_len=256
    )

    assert {type(m).__name__ for m in llm.model.modules()} >= {"PackedLinear", "PackedEmbedding"}
    assert llm.chat(QUESTION, GREEDY) == Q4_K_M_ANSWER
    assert llm.chat(SHORT_QUESTION, GREEDY) == ANSWER


@pytest.mark.slow  # the float32 reference: dequantizes the whole file
def test_smollm2_q4_k_m_dequantized_answer():
    ckpt = load(shared_model(SMOLLM2_Q4_K_M), keep_quantized=False)
    model = build_model(ckpt, torch.device("cpu"), torch.float32)
    model.setup_caches(1, 256, torch.float32)
    llm = LLM(model, ckpt.tokenizer, chat_template=ckpt.chat_template)

    assert llm.chat(QUESTION, GREEDY) == Q4_K_M_ANSWER
