"""What a constrained row may generate, in one canonical, backend-neutral form: a `Guide` is the
kind of constraint (json_schema, regex, grammar, choice) and its source text. `make_guide` turns
SamplingParams' fields into one, checking types here and the schema or grammar itself with the
backend, so a bad one is a RequestError naming the parameter before any token is generated."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import RequestError

Kind = Literal["json_schema", "regex", "grammar", "choice"]
ANY_OBJECT = '{"type": "object"}'  # json_schema=True or {}: any JSON object (OpenAI's json_object)


@dataclass(frozen=True)
class Guide:
    """kind: which parameter it came from; text: a JSON schema as JSON text, a regex, a GBNF or
    Lark grammar, or the JSON list of choices."""

    kind: Kind
    text: str


def make_guide(
    json_schema: bool | dict | str | None = None,
    regex: str | None = None,
    grammar: str | None = None,
    choice: Sequence[str] | None = None,
) -> Guide | None:
    """The one Guide the arguments ask for (None when none does); RequestError when more than one
    is given or one is malformed. The backend checks the result (see `check`)."""
    given = {
        name: value
        for name, value in (
            ("json_schema", json_schema),
            ("regex", regex),
            ("grammar", grammar),
            ("choice", choice),
        )
        if value is not None and value is not False
    }
    if not given:
        return None
    if len(given) > 1:
        raise RequestError(
            f"give at most one constraint, got {' and '.join(given)}", param=list(given)[1]
        )
    ((kind, value),) = given.items()
    if kind == "json_schema":
        return Guide("json_schema", _schema_text(value))
    if kind == "choice":
        if isinstance(value, str) or not all(isinstance(c, str) and c for c in value) or not value:
            raise RequestError(
                f"choice must be a non-empty list of non-empty strings, got {value!r}",
                param="choice",
            )
        return Guide("choice", json.dumps(list(value)))
    if not isinstance(value, str) or not value.strip():
        raise RequestError(f"{kind} must be a non-empty string, got {value!r}", param=kind)
    return Guide(kind, value)


def _schema_text(value: Any) -> str:
    if value is True:
        return ANY_OBJECT
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RequestError(
                f"json_schema is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})",
                param="json_schema",
            ) from e
    if not isinstance(value, dict):
        raise RequestError(
            f"json_schema must be a JSON schema object (or True for any object), got {value!r}",
            param="json_schema",
        )
    return json.dumps(value) if value else ANY_OBJECT
