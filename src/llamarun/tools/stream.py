"""An answer's text as content and tool calls: `ToolReader.final` for the whole text, and
`ToolStream` for text arriving piece by piece, as the deltas OpenAI streams (a call's id, type
and name once, then fragments of its arguments, keyed by index).

Both read with the same format reader (formats.py), so the streamed pieces join to the final
answer. A constrained answer (a forced call, the generic format) is read as it grows; a free
one (tool_choice auto with a template's own format) streams its text until a call begins, and
the calls are judged on the whole text: malformed ones come back as text, not dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .formats import READERS, PartialCall, Reading
from .request import ToolCall, new_call_id


@dataclass
class Delta:
    """One piece of a streamed answer: text, or part of call number `index`."""

    content: str | None = None
    index: int | None = None
    id: str | None = None  # with the name, on a call's first delta only
    name: str | None = None
    arguments: str | None = None


class ToolReader:
    def __init__(self, format_name: str, constrained: bool):
        self.format_name = format_name
        self.constrained = constrained

    def read(self, text: str, final: bool = False) -> Reading | None:
        """What `text` holds (so far, unless final); None when it cannot be this format."""
        try:
            return READERS[self.format_name](text, final)
        except ValueError:  # Malformed, or json.loads refusing a key or a name
            return None

    def final(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """Content (None when only calls were made) and calls of a finished answer. Calls get
        no ids here (see `ids`). A constrained answer cut by the token budget keeps its
        unfinished last call, as OpenAI's do; a free one must parse or it is all text."""
        reading = self.read(text, final=True)
        if reading is None:
            return text, []
        if self.constrained:
            calls = [ToolCall(c.name, c.arguments) for c in reading.calls if c.name is not None]
            return (None if calls else reading.content), calls
        if not reading.in_call:
            return text, []
        calls = [_checked(c) for c in reading.calls]
        if not calls or None in calls:
            return text, []
        return (reading.content if reading.content.strip() else None), calls

    def ids(self, calls: list[ToolCall]) -> list[ToolCall]:
        for call in calls:
            call.id = call.id or new_call_id(self.format_name)
        return calls

    def stream(self) -> ToolStream:
        return ToolStream(self)


def _checked(call: PartialCall) -> ToolCall | None:
    """A complete call whose arguments are a JSON object (or a string holding one)."""
    if not call.done or call.name is None:
        return None
    try:
        arguments = json.loads(call.arguments)
        if isinstance(arguments, str):
            text, arguments = arguments, json.loads(arguments)
        else:
            text = call.arguments
    except json.JSONDecodeError:
        return None
    return ToolCall(call.name, text) if isinstance(arguments, dict) else None


class ToolStream:
    """Deltas of one answer as its text arrives; `finish` sends what is left and gives the
    final content and calls (with the ids already streamed)."""

    def __init__(self, reader: ToolReader):
        self.reader = reader
        self.text = ""
        self.sent_content = ""
        self.sent_calls: list[tuple[str, int]] = []  # (id, length of arguments sent)
        self.held = False  # a free answer's call began: the rest waits for `finish`

    def push(self, piece: str) -> list[Delta]:
        self.text += piece
        if self.held:
            return []
        reading = self.reader.read(self.text)
        if reading is None:  # keep it for finish, which returns it as text
            self.held = True
            return []
        deltas = self._content(reading.content)
        if reading.in_call and not self.reader.constrained:
            self.held = True
        elif self.reader.constrained:
            deltas += self._calls(reading.calls)
        return deltas

    def finish(self) -> tuple[list[Delta], str | None, list[ToolCall]]:
        content, calls = self.reader.final(self.text)
        deltas = self._content(content or "", final=True)
        deltas += self._calls([PartialCall(c.name, c.arguments, True) for c in calls])
        for call, (call_id, _) in zip(calls, self.sent_calls):
            call.id = call_id
        return deltas, content, calls

    def _content(self, content: str, *, final: bool = False) -> list[Delta]:
        # nothing while the answer is only whitespace: a call may follow, and then there is
        # no content at all
        if not content.startswith(self.sent_content) or (not final and not content.strip()):
            return []
        new, self.sent_content = content[len(self.sent_content) :], content
        return [Delta(content=new)] if new else []

    def _calls(self, calls: list[PartialCall]) -> list[Delta]:
        deltas = []
        for index, call in enumerate(calls):
            if call.name is None:
                break
            if index == len(self.sent_calls):
                call_id = new_call_id(self.reader.format_name)
                self.sent_calls.append((call_id, 0))
                deltas.append(Delta(index=index, id=call_id, name=call.name, arguments=""))
            call_id, sent = self.sent_calls[index]
            if len(call.arguments) > sent:
                deltas.append(Delta(index=index, arguments=call.arguments[sent:]))
                self.sent_calls[index] = (call_id, len(call.arguments))
        return deltas
