"""Speculative decoding (speculate.py): the same greedy tokens as plain decoding with every
drafter and checkpoint format, the target's distribution when sampling, the cache rolled back
after a rejection, k adapted to the acceptance rate, and clear errors for bad settings."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from conftest import shared_model
from tiny import llamarun_state, meta_params, write_gguf, write_hf, write_meta
from tiny_llama2c import write_llama2c

import llamarun
from llamarun.build import prepare
from llamarun.config import ModelArgs
from llamarun.engine import Engine
from llamarun.errors import ConfigError
from llamarun.model import Transformer
from llamarun.sampling import SamplingParams
from llamarun.speculate import Draft, ModelDrafter, Speculator, best_k, check_speculation, choose

GREEDY = SamplingParams(temperature=0, max_new_tokens=32)
# a repeated phrase: prompt lookup finds its continuation earlier in the prompt
PROMPT = [1, 5, 6, 7, 8, 9, 10, 11, 5, 6, 7, 8, 9, 10, 11, 5, 6, 7]
# chi-square critical values at p = 0.001 (scipy.stats.chi2.isf(0.001, df)), by degrees of freedom
CHI2_CRITICAL = {3: 16.27, 15: 37.70}


def tiny(seed: int = 0, std: float = 0.3, **fields) -> Transformer:
    shape = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=320)
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**(shape | fields), max_seq_len=128))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=std)  # spread logits: greedy picks far from ties
    return model.eval()


def write_format(fmt: str, model: Transformer, directory: Path) -> Path:
    state, args = llamarun_state(model), model.args
    if fmt == "hf":
        return write_hf(model, directory / fmt)
    if fmt.startswith("meta"):
        return write_meta(state, meta_params(args), directory / fmt, shards=int(fmt[-1]))
    if fmt.startswith("gguf"):
        return write_gguf(state, args, directory / f"{fmt}.gguf", qtype=fmt[5:].upper())
    return write_llama2c(directory / f"{fmt}.bin", model)


def tokens_of(llm, prompt=PROMPT, params=GREEDY) -> list[int]:
    return [row[0] for row in llm.generate([prompt], params)]


def perturbed_draft(model: Transformer, path: Path) -> Path:
    """The model with a little noise on every weight: a draft that mostly agrees with it."""
    draft = tiny()
    with torch.no_grad():
        for p, q in zip(draft.parameters(), model.parameters()):
            p.copy_(q + 0.03 * torch.randn_like(q))
    return write_llama2c(path, draft)


LOOKUP, DRAFT = dict(speculate="lookup", speculate_k=4), dict(draft="{draft}", speculate_k=4)
INT8, INT4 = dict(draft="int8"), dict(draft="int4", speculate_k=3)
# every format with two drafters, every drafter in two formats (a packed GGUF is quantized
# already: no self-draft)
MATRIX = {
    "hf": [INT8, LOOKUP],
    "meta-2": [INT4, DRAFT],
    "gguf-f32": [INT8, INT4],
    "gguf-q8_0": [LOOKUP, DRAFT],
    "llama2c": [LOOKUP, INT4],
}


@pytest.mark.parametrize("fmt", MATRIX)
def test_greedy_tokens_equal_plain_decoding_with_every_drafter(fmt, tmp_path):
    path = write_format(fmt, tiny(), tmp_path)
    draft = perturbed_draft(tiny(), tmp_path / "draft.bin")
    plain = tokens_of(llamarun.load(path, max_batch_size=2))
    for mode in MATRIX[fmt]:
        mode = {k: v.format(draft=draft) if isinstance(v, str) else v for k, v in mode.items()}
        llm = llamarun.load(path, max_batch_size=2, **mode)
        assert tokens_of(llm) == plain, mode
        stats = llm.speculation
        assert stats["rounds"] > 0 and stats["accepted"] > 0, (mode, stats)
        if mode.get("draft") == "int4":  # the int4 copy is rejected somewhere: a rollback
            assert stats["accepted"] < stats["proposed"]


class ScriptedDrafter:
    """Proposes the known plain continuation with every third token wrong, so each round keeps
    a prefix and rejects: the cache row must be rolled back for decoding to stay exact."""

    free = False

    def __init__(self, answer: list[int], prompt_len: int):
        self.answer, self.prompt_len = answer, prompt_len

    def propose(self, slot, state, k):
        done = len(state.tokens) - self.prompt_len
        tokens = self.answer[done : done + k]
        return Draft([(t + 1) % 320 if (done + i) % 3 == 2 else t for i, t in enumerate(tokens)])

    def sync(self, slot, state, agreed):
        pass


def fresh() -> Transformer:
    model = tiny()
    model.setup_caches(2, 128)
    return model


def test_decoding_after_a_rejection_equals_plain_decoding():
    llm = prepare(fresh(), None)
    plain = tokens_of(llm)
    short = SamplingParams(temperature=0, max_new_tokens=8)
    other = tokens_of(llm, [1, 2, 3], short)
    spec = Speculator(ScriptedDrafter(plain, len(PROMPT)), method="scripted", k=4)
    llm.engine.speculator = spec
    assert tokens_of(llm) == plain
    stats = spec.stats
    assert stats.rounds > 10 and 0 < stats.accepted < stats.proposed
    # the row's cache past the kept tokens held rejected drafts: the next request is unaffected
    assert tokens_of(llm, [1, 2, 3], short) == other


def test_stories260k_greedy_text_is_the_same_with_every_drafter():
    path = shared_model("stories260K/stories260K.bin")
    tokenizer = path.with_name("tok512.model")
    prompt = "Once upon a time, there was a little girl named Lily. She loved to play"
    params = SamplingParams(temperature=0, max_new_tokens=80)
    plain = llamarun.load(path, tokenizer=tokenizer, max_batch_size=1).complete(prompt, params)
    for mode in (
        dict(speculate="lookup"),
        dict(draft="int8"),
        dict(draft="int4"),
        dict(draft=str(path), speculate_k=4),  # itself: every drafted token is kept
    ):
        llm = llamarun.load(path, tokenizer=tokenizer, max_batch_size=1, **mode)
        assert llm.complete(prompt, params) == plain, mode
        assert llm.speculation["rounds"] > 0, mode
    assert llm.speculation["acceptance_rate"] == 1.0
    assert llm.speculation["tokens_per_forward"] > 3


@pytest.mark.slow
def test_smollm2_copies_a_paragraph_with_prompt_lookup_and_the_same_text():
    path = shared_model("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
    text = (
        "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with "
        "a single step. All that glitters is not gold."
    )
    messages = [{"role": "user", "content": f"Repeat the following paragraph exactly:\n\n{text}"}]
    params = SamplingParams(temperature=0, max_new_tokens=40)
    plain = llamarun.load(path, max_batch_size=1).chat(messages, params)
    llm = llamarun.load(path, max_batch_size=1, speculate="lookup")
    assert llm.chat(messages, params) == plain
    assert llm.speculation["acceptance_rate"] > 0.5 and llm.speculation["tokens_per_forward"] > 2


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("point_mass", [True, False])
def test_rejection_sampling_draws_from_the_target(point_mass):
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([1.0, 0.2, -0.5, 0.7])
    p = torch.softmax(logits, -1)
    q = torch.tensor([0.1, 0.6, 0.2, 0.1])
    params = SamplingParams(temperature=1.0)
    counts = torch.zeros(4)
    for _ in range(4000):
        proposed = 1 if point_mass else int(torch.multinomial(q, 1, generator=g))
        counts[choose(logits, params, g, proposed, None if point_mass else q)] += 1
    assert chi_square(counts, p) < CHI2_CRITICAL[3]
    # the test has power: a draw that kept every draft token would follow q (or the point mass)
    assert chi_square(q * 4000, p) > 10 * CHI2_CRITICAL[3]


@pytest.fixture
def one_thread():
    """A tiny model gains nothing from threads, and they stall on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_sampled_tokens_through_a_draft_model_follow_the_target_distribution(one_thread):
    """The first two new tokens, (t1, t2), over 2000 seeds: t1 comes from the prefill, t2 from a
    speculative round (the draft's token kept with min(1, p/q), else the residual)."""
    shape = dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64, vocab_size=4)
    target, draft = tiny(0, std=0.5, **shape), tiny(1, std=0.5, **shape)
    target.setup_caches(1, 16)
    draft.setup_caches(1, 16)
    prompt = [0, 1, 2, 3]
    with torch.no_grad():
        p1 = torch.softmax(target(torch.tensor([prompt]), torch.arange(4)[None])[0], -1)
        seqs = torch.tensor([[*prompt, t] for t in range(4)])
        target.setup_caches(4, 16)
        p2 = torch.softmax(target(seqs, torch.arange(5).expand(4, 5)), -1)  # (t1, t2)
        draft.setup_caches(4, 16)
        q2 = torch.softmax(draft(seqs, torch.arange(5).expand(4, 5)), -1)
        target.setup_caches(1, 16)
        draft.setup_caches(1, 16)
    joint = (p1[:, None] * p2).flatten()  # P(t1, t2)
    # the test has power: kept drafts alone (t2 from the draft) would be far from it
    assert chi_square(2000 * (p1[:, None] * q2).flatten(), joint) > 10 * CHI2_CRITICAL[15]
    spec = Speculator(ModelDrafter(draft, draft, shares_cache=False), method="draft", k=1)
    engine = Engine(target, frozenset(), speculator=spec)
    counts = torch.zeros(16)
    for seed in range(2000):
        params = SamplingParams(temperature=1.0, seed=seed, max_new_tokens=3)
        t1 = engine.add(0, prompt, params).token_id
        t2 = engine.step()[0].token_id
        engine.release(0)
        counts[4 * t1 + t2] += 1
    stats = spec.stats
    assert stats.rounds == 2000 and 0.1 < stats.acceptance_rate < 0.9  # both branches taken
    assert chi_square(counts, joint) < CHI2_CRITICAL[15]


def test_adaptive_k_grows_with_acceptance_and_stops_drafting_when_nothing_is_kept():
    assert best_k(0.9, 0.1, 10) >= 6 and best_k(0.6, 0.1, 10) < best_k(0.9, 0.1, 10)
    assert best_k(0.0, 0.1, 10) == 0  # a draft that is never kept only costs

    class WrongDrafter(ScriptedDrafter):
        def propose(self, slot, state, k):
            return Draft([(state.tokens[-1] + 1) % 320] * k)  # never what the model picks

    llm = prepare(fresh(), None)
    params = SamplingParams(temperature=0, max_new_tokens=100)
    plain = tokens_of(llm, params=params)
    llm.engine.speculator = spec = Speculator(WrongDrafter([], 0), method="wrong")
    assert tokens_of(llm, params=params) == plain
    # a few short tries, then mostly plain steps while the estimate relaxes toward its prior:
    # under 0.25 checked draft tokens a step (each adds ~0.1 of a step: < 2.5% slower)
    stats = spec.stats
    assert stats.accepted == 0 and stats.proposed < 0.25 * (stats.rounds + stats.plain_steps)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(speculate="ngram"), "speculate must be 'lookup'"),
        (dict(speculate="lookup", draft="int8"), "choose one"),
        (dict(speculate_k=4), "nothing drafts"),
        (dict(speculate="lookup", speculate_k=0), "from 1 to 16, got 0"),
        (dict(draft="int4", speculate_k=17), "from 1 to 16, got 17"),
        (dict(speculate="lookup", compile=True), "--compile"),
        (dict(draft="int8", amx=True), "amx=True"),
    ],
)
def test_bad_settings_are_refused_with_a_sentence(kwargs, needle):
    kwargs = dict(speculate=None, draft=None, speculate_k=None) | kwargs
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        check_speculation(
            kwargs.pop("speculate"), kwargs.pop("draft"), kwargs.pop("speculate_k"), **kwargs
        )


def test_a_draft_with_another_vocabulary_names_both_sizes(tmp_path):
    path = write_llama2c(tmp_path / "target.bin", tiny())
    other = write_llama2c(tmp_path / "other.bin", tiny(vocab_size=256))
    with pytest.raises(ConfigError, match="vocabulary of 256 tokens but the model's has 320"):
        llamarun.load(path, draft=str(other))


def test_a_draft_larger_than_the_model_warns(tmp_path, caplog):
    path = write_llama2c(tmp_path / "target.bin", tiny())
    larger = write_llama2c(tmp_path / "larger.bin", tiny(n_layers=4))
    with caplog.at_level(logging.WARNING, logger="llamarun"):
        llm = llamarun.load(path, draft=str(larger), speculate_k=2)
    assert "is larger than the model" in caplog.text
    assert tokens_of(llm) == tokens_of(llamarun.load(path))


def test_a_quantized_draft_costs_what_its_integer_products_cost_not_its_bytes():
    import copy

    from llamarun.quantize import quantize_
    from llamarun.speculate import CPU_QUANTIZED_BYTES_PER_WEIGHT, relative_cost
    from llamarun.weights import weight_bytes_per_step

    target = tiny()
    for mode in ("int4", "int8"):
        draft = quantize_(copy.deepcopy(target), mode)
        by_bytes = weight_bytes_per_step(draft) / weight_bytes_per_step(target)
        weights = sum(
            m.in_features * m.out_features
            for m in target.modules()
            if isinstance(m, torch.nn.Linear)
        )
        others = weight_bytes_per_step(target) - 4 * weights  # the norms stay float32

        cost = relative_cost(draft, target)

        assert cost > by_bytes
        expected = (CPU_QUANTIZED_BYTES_PER_WEIGHT * weights + others) / weight_bytes_per_step(
            target
        )
        assert cost == pytest.approx(expected, rel=1e-6), mode


def test_prompt_lookup_picks_the_copy_up_where_it_stopped_agreeing():
    from types import SimpleNamespace

    from llamarun.speculate import LookupDrafter, _NgramIndex

    text = [5, 1, 2, 7, 8, 3, 1, 2, 9, 4]  # the suffix (1, 2) is followed by 7, later by 9
    index = _NgramIndex((3, 2))
    assert index.find([*text, 1, 2]) == 8  # no copy under way: the latest occurrence
    assert index.find([*text, 1, 2], near=2) == 3  # the copy stood at 2: the one there
    assert _NgramIndex((3, 2)).find([*text, 6, 8]) is None  # a lone token: only near a copy
    assert _NgramIndex((3, 2)).find([*text, 6, 8], near=3) == 5  # the 8 at 4, continuing at 5

    drafter, state = LookupDrafter(), SimpleNamespace(tokens=[*text, 7, 8])
    assert drafter.propose(0, state, 2).tokens == [3, 1]  # what followed (7, 8)
    drafter.sync(0, state, len(state.tokens) + 1)  # 3 kept; the model said 6 for the 1
    state.tokens += [3, 6, 2]  # ... and then 2: (6, 2) is nowhere in the text
    assert drafter.propose(0, state, 2).tokens == [9, 4]  # the 2 near where the copy stood
    assert LookupDrafter().propose(0, state, 2).tokens == []  # without that, nothing
