"""Constrained decoding (guided/ and the engine's use of it) on the tiny random model: whatever a
random model prefers, the output follows the schema, regex, grammar or choice, for every
tokenizer kind llamarun loads."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from test_tokenizer_gguf import tiny_gpt2_metadata
from tiny_tokenizers import (
    write_hf_tokenizer,
    write_llama2c_tokenizer,
    write_sentencepiece,
    write_tiktoken,
)

from llamarun.errors import RequestError
from llamarun.guided import LLGUIDANCE, Backend, Constraints, make_guide
from llamarun.guided.masks import MaskBatch, overlap_helps
from llamarun.guided.vocab import lltokenizer
from llamarun.llm import LLM
from llamarun.sampling import SamplingParams
from llamarun.tokenizer import load_tokenizer
from llamarun.tokenizer.gguf import GGUFTokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "pet": {"enum": ["cat", "dog"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 2},
    },
    "required": ["ok", "n", "pet"],
}
KINDS = ["sentencepiece", "llama2c", "tiktoken", "hf", "gguf"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokenizers")
    for kind in ("sp", "tt", "hf", "gguf"):
        (d / kind).mkdir()
    sp_path = write_sentencepiece(d / "sp")
    return {
        "sentencepiece": load_tokenizer(sp_path),
        "llama2c": load_tokenizer(write_llama2c_tokenizer(sp_path, d / "tokenizer.bin")),
        "tiktoken": load_tokenizer(write_tiktoken(d / "tt")),
        "hf": load_tokenizer(write_hf_tokenizer(d / "hf")),
        "gguf": GGUFTokenizer.from_metadata(
            tiny_gpt2_metadata(d / "gguf", "default"), d / "gguf" / "t.gguf"
        ),
    }


@pytest.fixture
def llm(tiny_model, tokenizers):
    tiny_model.setup_caches(4, 128)
    return LLM(tiny_model, tokenizers["hf"])


@pytest.mark.parametrize(
    "kwargs, param, words",
    [
        (dict(json_schema={"type": "frob"}), "json_schema", "frob"),
        (dict(json_schema="{not json"), "json_schema", "not valid JSON"),
        (dict(json_schema=[1]), "json_schema", "JSON schema object"),
        (dict(regex="[a-"), "regex", "unclosed character class"),
        (dict(grammar='root ::= "a" | undefined-rule'), "grammar", "undefined"),
        (dict(grammar="start: foo"), "grammar", "unknown name"),
        (dict(choice=[]), "choice", "non-empty list"),
        (dict(choice="yes"), "choice", "non-empty list"),
        (dict(regex="a", choice=["a"]), "choice", "at most one"),
    ],
)
def test_bad_constraints_are_request_errors_naming_the_parameter(kwargs, param, words):
    with pytest.raises(RequestError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param and words in str(info.value)
    assert "\n" not in str(info.value)  # one sentence, not llguidance's caret drawing


def test_json_schema_true_and_empty_mean_any_object():
    any_object = SamplingParams(json_schema=True).guide
    assert any_object == SamplingParams(json_schema={}).guide
    assert json.loads(any_object.text) == {"type": "object"}
    assert SamplingParams().guide is None and SamplingParams(json_schema=False).guide is None


@pytest.mark.parametrize("kind", KINDS)
def test_every_tokenizer_kind_generates_schema_valid_json(tiny_model, tokenizers, kind):
    tiny_model.setup_caches(2, 128)
    llm = LLM(tiny_model, tokenizers[kind])
    for seed in (0, 1):
        params = SamplingParams(temperature=1.0, seed=seed, max_new_tokens=80, json_schema=SCHEMA)
        (out,) = llm.complete_batch(["The cat"], params)
        jsonschema.validate(json.loads(out.text), SCHEMA)  # the whole text, nothing after it
        assert out.finish_reason == "stop"


def test_byte_vocabulary_tokenizes_without_the_dummy_prefix(tokenizers):
    # llguidance allows the first id of the bytes a grammar forces: "▁{" would add a space
    sp = tokenizers["sentencepiece"]
    view = lltokenizer(sp, 320)
    for text in (b'{"', b"{", b" cat", b"dog"):
        assert view.decode_bytes(view.tokenize_bytes(text)) == text


def test_regex_choice_gbnf_and_lark(llm):
    def answer(**constraint) -> str:
        return llm.complete("x", SamplingParams(temperature=0, max_new_tokens=30, **constraint))

    assert re.fullmatch(r"[0-9]{2}-[a-c]{3}", answer(regex=r"[0-9]{2}-[a-c]{3}"))
    assert answer(choice=["left", "right", "up"]) in ("left", "right", "up")
    assert answer(grammar='root ::= "yes" | "no"') in ("yes", "no")
    assert re.fullmatch(r"id=[0-9]{3}", answer(grammar='start: "id=" NUM\nNUM: /[0-9]{3}/'))


def test_a_constrained_greedy_row_does_not_take_the_free_argmax(llm):
    free = llm.complete("x", SamplingParams(temperature=0, max_new_tokens=4))
    letter = next(c for c in "qzjx" if not free.startswith(c))
    forced = llm.complete("x", SamplingParams(temperature=0, max_new_tokens=9, regex=letter * 4))
    assert forced == letter * 4


def test_a_batch_mixes_constrained_and_free_rows(llm):
    free = SamplingParams(temperature=0, max_new_tokens=12)
    json_row = SamplingParams(temperature=0, max_new_tokens=60, json_schema=SCHEMA)
    prompts = [llm.encode("one"), llm.encode("two"), llm.encode("three")]
    alone = [list(t for (t,) in llm.generate([p], free)) for p in prompts[1:]]
    rows = list(llm.generate(prompts, [json_row, free, free]))
    assert [[r[i] for r in rows if r[i] is not None] for i in (1, 2)] == alone
    text = llm.tokenizer.decode([r[0] for r in rows if r[0] is not None])
    jsonschema.validate(json.loads(text), SCHEMA)


def test_a_guide_compiles_once_and_each_row_gets_its_own_matcher(tokenizers):
    compiled = []

    def counting_compile(guide, tokenizer, vocab_size):
        compiled.append(guide)
        return LLGUIDANCE.compile(guide, tokenizer, vocab_size)

    constraints = Constraints(
        tokenizers["hf"], 320, Backend("counting", LLGUIDANCE.check, counting_compile)
    )
    guide = make_guide(choice=["ab", "ac"])
    first, second = constraints.matcher(guide), constraints.matcher(guide)
    a, b = (lltokenizer(tokenizers["hf"], 320).tokenize_str(s) for s in ("a", "b"))
    assert first.consume(a[0]) and first.consume(b[0]) and first.is_stopped()
    assert not second.is_accepting() and not second.is_stopped()  # untouched by the first
    assert compiled == [guide]


def test_n_choices_of_one_guide_each_follow_it(llm):
    choices = [  # as the server's n: one prompt, one guide, a seed per choice
        SamplingParams(temperature=1.0, seed=seed, max_new_tokens=80, json_schema=SCHEMA)
        for seed in (5, 6, 7)
    ]
    rows = list(llm.generate([llm.encode("a")] * 3, choices))
    texts = [llm.tokenizer.decode([r[i] for r in rows if r[i] is not None]) for i in range(3)]
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(texts)) > 1


def test_threaded_and_inline_masks_pick_the_same_tokens(llm):
    params = SamplingParams(temperature=1.0, seed=3, max_new_tokens=60, json_schema=SCHEMA)
    llm.engine.masks.threaded = True  # the default only where a core is free for the worker
    threaded = llm.complete("go", params)
    llm.engine.masks.threaded = False
    assert llm.complete("go", params) == threaded


def test_the_mask_worker_runs_only_beside_a_gpu_or_a_free_core(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert not overlap_helps(torch.device("cpu"))  # every core is in torch's team
    assert overlap_helps(torch.device("cuda"))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert overlap_helps(torch.device("cpu"))


def test_the_token_budget_still_ends_a_constrained_row(llm):
    params = SamplingParams(temperature=0, max_new_tokens=5, regex="[a-z]{10,}")
    (out,) = llm.complete_batch(["x"], params)
    assert out.finish_reason == "length" and len(out.token_ids) == 5


def test_constrained_logprobs_list_only_allowed_alternatives(llm):
    out = llm.engine.add(0, llm.encode("x"), SamplingParams(choice=["yes", "no"]), logprobs=5)
    llm.engine.release(0)
    assert 1 <= len(out.top_logprobs) <= 2 and all(lp > -1e9 for _, lp in out.top_logprobs)


class FakeMatcher:
    """Allows token 5 only; accepting as told."""

    def __init__(self, accepting: bool):
        self.accepting = accepting

    def fill_mask(self, row: torch.Tensor) -> None:
        row.zero_()
        row[0] = 1 << 5

    def is_accepting(self) -> bool:
        return self.accepting


@pytest.mark.parametrize("threaded", [True, False])
def test_masks_allow_a_rows_stop_ids_only_once_it_accepts(threaded):
    masks = MaskBatch(40, 4, threaded=threaded)
    logits = torch.zeros(3, 40)
    masks.start([FakeMatcher(accepting=False), FakeMatcher(accepting=True)])
    masks.apply_(logits, [0, 2], [{7}, {7, 39}])
    allowed = [set(torch.nonzero(row > -float("inf")).flatten().tolist()) for row in logits]
    assert allowed == [{5}, set(range(40)), {5, 7, 39}]
