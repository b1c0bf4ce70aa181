"""The llguidance backend: a Guide becomes an llguidance grammar (JSON schema, regex, Lark; GBNF
through llguidance's converter), checked without a tokenizer and compiled into an `LLMatcher`
with the tokenizer's view (vocab.py). See llguidance's docs/syntax.md and docs/json_schema.md."""

from __future__ import annotations

import json
from functools import lru_cache

import llguidance
import torch
from llguidance.gbnf_to_lark import any_to_lark

from ..errors import RequestError
from ..tokenizer import Tokenizer
from .guide import Guide
from .vocab import lltokenizer

# One line of JSON with json.dumps' separators: a small model left free pads with newlines and
# indentation until the budget runs out. A schema's own "x-guidance" options still apply.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Subschemas that are schemas themselves (JSON Schema 2020-12 applicators), where objects close.
_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SCHEMAS = ("items", "additionalItems", "contains", "not", "if", "then", "else")
NAMES = {"json_schema": "JSON schema", "regex": "regex", "grammar": "grammar", "choice": "choice"}


@lru_cache(maxsize=256)
def grammar_of(guide: Guide) -> str:
    """The llguidance grammar for a Guide; RequestError naming the parameter if it is invalid."""
    try:
        if guide.kind == "json_schema":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                closed(json.loads(guide.text)), defaults=JSON_OPTIONS
            )
        elif guide.kind == "regex":
            grammar = llguidance.LLMatcher.grammar_from_regex(guide.text)
        elif guide.kind == "choice":
            lark = "start: " + " | ".join(json.dumps(c) for c in json.loads(guide.text))
            grammar = llguidance.LLMatcher.grammar_from_lark(lark)
        else:
            grammar = llguidance.LLMatcher.grammar_from_lark(any_to_lark(guide.text))
    except Exception as e:  # the GBNF converter raises plain Exceptions with a message
        raise _invalid(guide, str(e)) from e
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        raise _invalid(guide, messages[0])
    return grammar


def closed(schema: object) -> object:
    """`schema` with `additionalProperties: false` on every object that lists its properties
    (even none: a function without arguments) and says nothing about others (xgrammar's strict mode, vLLM's default): every output still
    validates, but a small model cannot wander off into keys of its own until the budget ends.
    allOf branches stay open, as each names only part of the object's properties."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed(sub) for name, sub in out[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed(sub) for sub in out[key]]
    for key in _SCHEMAS:
        if key in out:
            out[key] = closed(out[key])
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = closed(out["additionalProperties"])
    open_keys = ("additionalProperties", "patternProperties", "unevaluatedProperties")
    if isinstance(out.get("properties"), dict) and not any(k in out for k in open_keys):
        out["additionalProperties"] = False
    return out


def _invalid(guide: Guide, why: str) -> RequestError:
    why = " ".join(why.split())  # llguidance's messages span lines with a caret drawing
    return RequestError(f"invalid {NAMES[guide.kind]}: {why}", param=guide.kind)


class LLGuidanceMatcher:
    """One row's parser state over the token stream."""

    def __init__(self, matcher: llguidance.LLMatcher):
        self._m = matcher

    def fill_mask(self, row: torch.Tensor) -> None:
        """Write the allowed next tokens into `row`, a contiguous (W,) int32 CPU tensor: bit
        i % 32 of word i // 32 set when token i may come next. Releases the GIL."""
        self._m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)

    def consume(self, token_id: int) -> bool:
        return self._m.consume_token(token_id)

    def is_accepting(self) -> bool:
        return self._m.is_accepting()

    def is_stopped(self) -> bool:
        return self._m.is_stopped()

    def error(self) -> str | None:
        return self._m.get_error() or None

    def fork(self) -> LLGuidanceMatcher:
        return LLGuidanceMatcher(self._m.deep_copy())


def compile_guide(guide: Guide, tokenizer: Tokenizer, vocab_size: int) -> LLGuidanceMatcher:
    """A matcher in its start state; RequestError if the grammar does not fit this tokenizer
    (a special token it names is not in the vocabulary)."""
    matcher = llguidance.LLMatcher(
        lltokenizer(tokenizer, vocab_size), grammar_of(guide), log_level=0
    )  # quiet: its errors come back as one sentence (engine.Engine._consume)
    if matcher.is_error():
        raise _invalid(guide, matcher.get_error())
    return LLGuidanceMatcher(matcher)
