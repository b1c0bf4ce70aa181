"""Where JSON values begin and end in text that may still be growing, so a tool call's name and
raw arguments can be read from the same text while it streams and once it is complete. Nothing
here decodes a whole document: json.loads checks the pieces that matter."""

from __future__ import annotations

import json
from dataclasses import dataclass

WHITESPACE = " \t\n\r"


class Malformed(ValueError):
    """The text cannot be the start of the JSON expected here."""


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in WHITESPACE:
        i += 1
    return i


def value_end(text: str, i: int) -> int | None:
    """The index just after the JSON value that starts at text[i], or None when the text ends
    inside it. Strings, nesting and escapes are followed; literals are not checked here."""
    if i >= len(text):
        return None
    depth, in_string, escaped = 0, False, False
    for j in range(i, len(text)):
        c = text[j]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
                if depth == 0:
                    return j + 1
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth < 0:
                raise Malformed(f"unexpected {c!r}")
            if depth == 0:
                return j + 1
        elif depth == 0 and (c in ",:" or c in WHITESPACE):
            return j  # the end of a number or literal
    return None


@dataclass
class Member:
    start: int  # where the value begins
    end: int | None  # just after it; None while the text ends inside it


def members(text: str, i: int) -> tuple[dict[str, Member], int | None]:
    """The members of the object that starts at text[i] (key -> value span; a key whose string
    is not finished is left out) and the index after its "}" (None while unfinished)."""
    if text[i : i + 1] != "{":
        raise Malformed("expected an object")
    found: dict[str, Member] = {}
    i = skip_ws(text, i + 1)
    if text[i : i + 1] == "}":
        return found, i + 1
    while i < len(text):
        key_end = value_end(text, i)
        if text[i] != '"':
            raise Malformed("expected a key")
        if key_end is None:
            return found, None
        key = json.loads(text[i:key_end])
        i = skip_ws(text, key_end)
        if i >= len(text):
            return found, None
        if text[i] != ":":
            raise Malformed("expected ':'")
        start = skip_ws(text, i + 1)
        end = value_end(text, start)
        found[key] = Member(start, end)
        if end is None:
            return found, None
        i = skip_ws(text, end)
        if i >= len(text):
            return found, None
        if text[i] == "}":
            return found, i + 1
        if text[i] != ",":
            raise Malformed("expected ',' or '}'")
        i = skip_ws(text, i + 1)
    return found, None


def string_prefix(text: str, member: Member) -> str:
    """The decoded part of a JSON string value written so far (all of it once it is complete),
    never cutting an escape sequence in half."""
    if member.end is not None:
        return json.loads(text[member.start : member.end])
    raw = text[member.start + 1 :]
    cut = len(raw)
    backslash = raw.rfind("\\", max(0, cut - 6))
    if backslash >= 0:
        escape = raw[backslash:]
        # a lone backslash, or \u with fewer than 4 hex digits, is not finished
        if len(escape) == 1 or (escape[1] == "u" and len(escape) < 6):
            cut = backslash
    while cut > 0:
        try:
            decoded = json.loads('"' + raw[:cut] + '"')
        except json.JSONDecodeError:
            cut -= 1
            continue
        # the first half of a surrogate pair (\ud83d of an emoji) waits for its second half
        return decoded[:-1] if "\ud800" <= decoded[-1:] <= "\udbff" else decoded
    return ""
