"""Prefix caching on a tiny random model: a warm start is bitwise a cold one (cache rows, tokens),
only whole chunks are reused, rows and the pool both serve, and the pool's bound holds."""

from __future__ import annotations

import io

import pytest
import torch
from test_generate import ByteTokenizer

import llamarun
from llamarun.cli.chat import Chat
from llamarun.config import ModelArgs
from llamarun.errors import ConfigError
from llamarun.llm import LLM
from llamarun.model import Transformer
from llamarun.plan import plan_memory
from llamarun.prefix_cache import block_bytes
from llamarun.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_new_tokens=10)
SEEDED = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_new_tokens=10)
SYSTEM = "You are a terse assistant who answers in one line. " * 2  # 100 bytes: 3 whole chunks
TEMPLATE = (
    "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def make_llm(*, batch: int = 2, prefix_cache_bytes: int = 10**7) -> LLM:
    torch.manual_seed(0)
    args = ModelArgs(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=320, max_seq_len=512
    )
    model = Transformer(args)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    model.eval().setup_caches(batch, 512)
    llm = LLM(model, ByteTokenizer(), chat_template=TEMPLATE, prefix_cache_bytes=prefix_cache_bytes)
    llm.engine.prefill_chunk = 32  # short prompts: small chunks, so they have whole ones to reuse
    return llm


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    # a tiny model gains nothing from threads, and they stall on a busy machine
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cold() -> LLM:
    return make_llm(prefix_cache_bytes=0)


def rows(llm: LLM, slot: int, n: int) -> list[torch.Tensor]:
    caches = [layer.attention.kv_cache for layer in llm.model.layers]
    return [t[slot, :, :n].clone() for c in caches for t in (c.k, c.v)]


def test_a_warm_prompt_writes_the_rows_and_tokens_of_a_cold_one(cold):
    warm = make_llm()
    chunk = warm.engine.prefill_chunk
    warm.complete(SYSTEM + "What is 2+2?", GREEDY)
    prompt = SYSTEM + "Name a colour."
    for params in (GREEDY, SEEDED):
        got = warm.complete(prompt, params)
        assert warm.last_stats.cached_tokens == len(SYSTEM) // chunk * chunk  # BOS + 100 bytes
        assert got == cold.complete(prompt, params)
        n = len(prompt) + 1
        for w, c in zip(rows(warm, 0, n), rows(cold, 0, n)):
            assert torch.equal(w, c)  # bitwise: reuse never trades exactness for speed


def test_only_whole_chunks_inside_the_shared_prefix_are_reused():
    llm = make_llm()
    chunk = llm.engine.prefill_chunk
    llm.complete("x" * (chunk - 2), GREEDY)  # BOS + chunk - 2: no whole chunk
    llm.complete("x" * (chunk - 2) + "yz", GREEDY)
    assert llm.last_stats.cached_tokens == 0
    llm.complete("x" * (3 * chunk), GREEDY)
    llm.complete("x" * (2 * chunk + 5) + "different", GREEDY)
    assert llm.last_stats.cached_tokens == 2 * chunk
    llm.complete("x" * (3 * chunk), GREEDY)  # all cached but the last chunk, for the logits
    assert llm.last_stats.cached_tokens == 3 * chunk


def test_chat_turn_n_prefills_only_what_is_new():
    llm = make_llm(batch=1)
    engine, chunk = llm.engine, llm.engine.prefill_chunk
    history = [{"role": "system", "content": SYSTEM}]
    previous = 0
    for turn in range(4):
        history.append({"role": "user", "content": f"question {turn}?"})
        before = engine.prefilled_tokens
        history.append({"role": "assistant", "content": llm.chat(history, GREEDY)})
        stats = llm.last_stats
        # the previous prompt is reused up to its last whole chunk; its answer, written by decode
        # steps, and the new message are prefilled
        assert stats.cached_tokens == previous // chunk * chunk
        assert engine.prefilled_tokens - before == stats.prompt_tokens - stats.cached_tokens
        previous = stats.prompt_tokens


def test_llamarun_chat_reuses_the_conversation_so_far():
    llm = make_llm(batch=1)
    chat = Chat(llm, GREEDY, system=SYSTEM, out=io.StringIO(), err=io.StringIO())
    chat.answer("Hi")
    first = llm.last_stats.prompt_tokens
    chat.answer("Tell me more")
    assert llm.last_stats.cached_tokens == first // llm.engine.prefill_chunk * 32 > 0


def test_an_idle_row_keeps_its_prefix_while_others_decode(cold):
    llm = make_llm()
    prompt = SYSTEM + "Hello there."
    llm.complete(prompt, GREEDY)  # row 0 now holds it
    engine = llm.engine
    engine.add(1, llm.encode("Another prompt, decoded for a while."), GREEDY)
    while engine.step():
        pass
    engine.release(1)
    assert engine.pick_slot(llm.encode(prompt)) == 0
    assert llm.complete(prompt, GREEDY) == cold.complete(prompt, GREEDY)
    assert llm.last_stats.cached_tokens == len(llm.encode(prompt)) // 32 * 32


def test_the_pool_serves_a_prefix_its_row_no_longer_holds(cold):
    llm = make_llm(batch=1)
    a, b = SYSTEM + "Question A?", "A different conversation " * 4
    llm.complete(a, GREEDY)
    llm.complete(b, GREEDY)  # overwrites the only row
    got = llm.complete(a, GREEDY)
    assert llm.last_stats.cached_tokens == len(llm.encode(a)) // 32 * 32
    assert got == cold.complete(a, GREEDY)


def test_a_small_pool_evicts_the_least_recently_used_and_stays_exact(cold):
    one_chunk = sum(block_bytes(layer.attention.kv_cache, 32) for layer in cold.model.layers)
    llm = make_llm(batch=1, prefix_cache_bytes=3 * one_chunk)  # 6 pages of 16
    pool = llm.engine.prefix.pool
    prompts = [f"Conversation {i}: " + "some shared words " * 5 for i in range(4)]
    for p in prompts:
        assert llm.complete(p, GREEDY) == cold.complete(p, GREEDY)
        assert len(pool.lru) <= 3 and pool.capacity == 6
    for p in reversed(prompts):  # the oldest were evicted: outputs stay exact either way
        assert llm.complete(p, GREEDY) == cold.complete(p, GREEDY)
    assert pool.used_bytes <= 3 * one_chunk


def test_chunks_end_at_a_turns_end_and_at_the_chunk_size(cold):
    engine = cold.engine
    engine.prefill_chunk = 32
    ids = [1] + [50] * 40 + [2] + [60] * 70  # 2 ends a turn (the model's end-of-text)
    cuts = list(engine.chunks(ids))
    assert cuts == [
        (0, 32, True),
        (32, 42, True),
        (42, 74, True),
        (74, 106, True),
        (106, 112, False),
    ]
    assert list(engine.chunks(ids, 42)) == cuts[2:]  # resumed where a chunk ended: the same cuts


def test_a_whole_turn_is_reused_up_to_its_end_token(cold):
    llm = make_llm()
    turn = [1] + [50 + i % 40 for i in range(45)] + [2]  # 47 tokens: one whole chunk and a turn end
    first = [list(t) for t in llm.generate([turn + [70, 71, 72]], GREEDY)]
    second = [t for (t,) in llm.generate([turn + [80, 81]], GREEDY)]
    assert first and llm.last_stats.cached_tokens == 47
    assert second == [t for (t,) in cold.generate([turn + [80, 81]], GREEDY)]


def test_off_means_every_prompt_is_prefilled_whole(cold):
    prompt = SYSTEM + "Again."
    cold.complete(prompt, GREEDY)
    cold.complete(prompt, GREEDY)
    assert cold.last_stats.cached_tokens == 0 and cold.engine.prefix is None


def test_forget_makes_the_next_prompt_cold():
    llm = make_llm()
    prompt = SYSTEM + "Again."
    llm.complete(prompt, GREEDY)
    llm.engine.forget()
    llm.complete(prompt, GREEDY)
    assert llm.last_stats.cached_tokens == 0


def test_the_default_pool_is_as_large_as_the_kv_cache():
    llm = make_llm(prefix_cache_bytes=None)  # a tiny KV cache: far below the 256 MB cap
    caches = [layer.attention.kv_cache for layer in llm.model.layers]
    assert llm.engine.prefix.max_bytes == sum(block_bytes(c, 2 * 512) for c in caches)


def test_a_split_model_refuses_a_prefix_cache(tmp_path):
    with pytest.raises(ConfigError, match="--prefix-cache-mb cannot be combined with --tp"):
        llamarun.load(tmp_path, tp=2, prefix_cache_mb=8)  # before anything is read


def test_the_memory_plan_counts_the_prefix_cache(tiny_args):
    without = plan_memory(tiny_args, device="cpu", dtype=torch.float32, free=10**12)
    with_cache = plan_memory(
        tiny_args, device="cpu", dtype=torch.float32, free=10**12, prefix_cache=5 * 10**8
    )
    assert with_cache.asked.total - without.asked.total == 5 * 10**8
    tight = plan_memory(
        tiny_args,
        device="cpu",
        dtype=torch.float32,
        free=without.asked.total + 10**6,
        prefix_cache=5 * 10**8,
    )
    assert not tight.fits and "--prefix-cache-mb 1" in tight.describe()
