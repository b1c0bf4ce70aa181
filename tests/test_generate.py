"""The engine and the Meta-compatible loop, on a tiny random model with a stand-in tokenizer."""

import pytest
import torch
import torch.nn.functional as F

from llamarun.errors import RequestError
from llamarun.llama import Llama
from llamarun.llm import LLM, TextStream
from llamarun.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_new_tokens=12)


class ByteTokenizer:
    """Ids 3..258 are bytes 0..255; 1 is BOS, 2 is EOS."""

    vocab_size, bos_id, eos_id, pad_id = 259, 1, 2, -1
    stop_ids = frozenset({2})
    add_bos, adds_dummy_prefix = True, False

    def encode(self, text, *, bos=True, eos=False, special=False):
        return [1] * bos + [b + 3 for b in text.encode()] + [2] * eos

    def decode(self, ids):
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id):
        return bytes([token_id - 3]) if 3 <= token_id < 259 else b""

    def token_to_id(self, piece):
        return None


@pytest.fixture
def llm(tiny_model):
    tiny_model.setup_caches(4, 96)
    return LLM(tiny_model, ByteTokenizer())


def rows_to_lists(rows, n):
    return [[r[i] for r in rows if r[i] is not None] for i in range(n)]


def test_batch_of_different_lengths_equals_each_alone(llm):
    prompts = [[1, 5, 6, 7, 8, 9], [1, 40], [1, 70, 71, 72, 73, 74, 75, 76, 77, 78]]
    batch = rows_to_lists(list(llm.generate(prompts, GREEDY)), 3)
    alone = [rows_to_lists(list(llm.generate([p], GREEDY)), 1)[0] for p in prompts]
    assert batch == alone
    assert all(len(b) == 12 for b in batch)


def test_generation_matches_full_forward_argmax(llm, tiny_model):
    prompt = [1, 10, 20, 30]
    out = rows_to_lists(list(llm.generate([prompt], GREEDY)), 1)[0]
    seq = list(prompt)
    for _ in range(12):
        tiny_model.setup_caches(1, 96)
        logits = tiny_model(torch.tensor([seq]), torch.arange(len(seq))[None])
        seq.append(int(logits.argmax(-1)))
    assert out == seq[len(prompt) :]


def test_seeded_sampling_is_reproducible_and_independent_of_batch(llm):
    params = SamplingParams(temperature=1.0, seed=42, max_new_tokens=10)
    a = rows_to_lists(list(llm.generate([[1, 5, 6]], params)), 1)[0]
    b = rows_to_lists(list(llm.generate([[1, 9], [1, 5, 6]], params)), 2)[1]
    assert a == b


def test_bad_requests(llm):
    with pytest.raises(RequestError, match="max_batch_size is 4"):
        list(llm.generate([[1]] * 5, GREEDY))
    with pytest.raises(RequestError, match="max_seq_len is 96"):
        list(llm.generate([[1] * 100], GREEDY))
    with pytest.raises(RequestError, match="outside the vocabulary"):
        list(llm.generate([[1, 999]], GREEDY))


def test_text_stream_holds_back_and_cuts_stop_strings():
    tok = ByteTokenizer()
    stream = TextStream(tok, stop=("END",))
    pieces = [stream.feed(t) for t in tok.encode("abc EN", bos=False)]
    assert "".join(pieces) == "abc "  # "EN" may begin "END": held back
    assert stream.feed(tok.encode("D", bos=False)[0]) == "" and stream.stopped
    assert stream.text == "abc "
    stream = TextStream(tok, stop=("END",))
    for t in tok.encode("xEN!", bos=False):
        stream.feed(t)
    assert stream.finish() == "" and stream.text == "xEN!"


def test_complete_batch_reports_finish_reasons(llm):
    results = llm.complete_batch(["ab", "cd"], SamplingParams(temperature=0, max_new_tokens=5))
    assert [r.finish_reason for r in results] == ["length", "length"]
    assert all(len(r.token_ids) == 5 for r in results)
    assert llm.complete("ab", SamplingParams(temperature=0, max_new_tokens=5)) == results[0].text


def reference_generate(model, prompt_tokens, max_gen_len, eos_id):
    """Meta's loop, greedy, recomputing the whole sequence each step (no cache)."""
    out, lps = [], []
    for prompt in prompt_tokens:
        seq = list(prompt)
        while len(seq) < len(prompt) + max_gen_len:
            model.setup_caches(1, 96)
            logits = model(torch.tensor([seq]), torch.arange(len(seq))[None])
            seq.append(int(logits.argmax(-1)))
            if seq[-1] == eos_id:
                break
        model.setup_caches(1, 96)
        logits = model(torch.tensor([seq]), torch.arange(len(seq))[None], all_logits=True)[0]
        lp = [0.0] + (
            -F.cross_entropy(logits[:-1], torch.tensor(seq[1:]), reduction="none")
        ).tolist()
        cut = seq.index(eos_id) if eos_id in seq else len(seq)
        out.append(seq[:cut])
        lps.append(lp[:cut])
    return out, lps


def test_meta_generate_echo_logprobs_match_reference(tiny_model):
    tiny_model.setup_caches(3, 96)
    llama = Llama(LLM(tiny_model, ByteTokenizer()))
    prompts = [[1, 5, 6, 7], [1, 9], [1, 11, 12, 13, 14, 15]]
    tokens, logprobs = llama.generate(
        prompts, max_gen_len=8, temperature=0, logprobs=True, echo=True
    )
    ref_tokens, ref_lps = reference_generate(tiny_model, prompts, 8, eos_id=2)
    assert tokens == ref_tokens
    for got, want in zip(logprobs, ref_lps):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-4, rtol=0)
    tiny_model.setup_caches(3, 96)
    no_echo, _ = llama.generate(prompts, max_gen_len=8, temperature=0)
    assert no_echo == [t[len(p) :] for t, p in zip(ref_tokens, prompts)]


def test_meta_generate_stops_each_row_at_eos(tiny_model):
    tiny_model.setup_caches(2, 96)
    tok = ByteTokenizer()
    prompts = [[1, 5, 6], [1, 7]]
    first = Llama(LLM(tiny_model, tok)).generate(prompts, max_gen_len=6, temperature=0)[0]
    tok.stop_ids = frozenset({2, first[0][2]})  # make row 0's third new token a stop token
    tokens, _ = Llama(LLM(tiny_model, tok)).generate(prompts, max_gen_len=6, temperature=0)
    assert tokens[0] == first[0][:2]
    assert len(tokens[1]) <= 6


def test_meta_sampling_is_seeded(tiny_model):
    tiny_model.setup_caches(2, 96)

    def make():
        return Llama(LLM(tiny_model, ByteTokenizer()), seed=3)

    a = make().generate([[1, 5], [1, 6, 7]], max_gen_len=8, temperature=0.8, top_p=0.9)
    b = make().generate([[1, 5], [1, 6, 7]], max_gen_len=8, temperature=0.8, top_p=0.9)
    assert a == b
    c = make().text_completion(["hi"], max_gen_len=4, logprobs=True)
    assert set(c[0]) == {"generation", "tokens", "logprobs"} and len(c[0]["logprobs"]) == len(
        c[0]["tokens"]
    )


@pytest.mark.parametrize("add_bos", [True, False])
def test_text_completion_follows_the_tokenizers_bos_policy(tiny_model, add_bos):
    tok = ByteTokenizer()
    tok.add_bos = add_bos  # True for every Meta/Llama tokenizer; False e.g. for SmolLM2's GGUF
    tiny_model.setup_caches(1, 96)
    llama = Llama(LLM(tiny_model, tok))

    out = llama.text_completion(["hi"], temperature=0, max_gen_len=1, logprobs=True, echo=True)

    fed = [t + 3 for t in b"hi"]  # what the prompt encodes to without BOS
    expected = ([""] if add_bos else []) + [chr(b) for b in b"hi"]  # BOS decodes to ""
    assert out[0]["tokens"][: len(expected)] == expected
    assert len(out[0]["tokens"]) == len(fed) + add_bos + 1
