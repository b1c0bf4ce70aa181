"""Chat formats: a list of {"role", "content"} messages -> prompt token ids, plus the ids that end a turn.

Families: Llama 2 (`[INST]`/`<<SYS>>`, as Meta's llama/generation.py chat_completion), Llama 3 (header
ids and `<|eot_id|>`, as Meta's llama3 ChatFormat), ChatML, and any Jinja `chat_template` from the
checkpoint, rendered the way transformers' `apply_chat_template` renders it. No sampling here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import RequestError, TokenizerError
from .base import END_OF_TURN, Tokenizer

Message = dict[str, Any]  # role, content; tool_calls, tool_call_id and name for tool calling
ROLES = ("system", "user", "assistant", "tool")
TOOL_KEYS = ("tool_calls", "tool_call_id", "name")  # passed on to templates that render tools

# Meta's llama/generation.py constants
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."

# Texts that special tokens usually have, to name an id whose decode() is empty (SentencePiece <s>).
_SPECIAL_NAMES = (
    "<s> </s> <unk> <pad> <|begin_of_text|> <|end_of_text|> <bos> <eos> <|endoftext|> "
    "<|startoftext|> <|im_start|> <|im_end|> <|eot_id|>"
).split()


class ChatFormat(Protocol):
    name: str
    stop_ids: frozenset[int]  # every stop id of the model plus the format's end-of-turn token

    def encode_dialog(
        self, messages: Sequence[Message], *, add_generation_prompt: bool = True
    ) -> list[int]:
        """Prompt ids for `messages`; with add_generation_prompt, ending where the assistant speaks."""


def validate_messages(messages: Sequence[Message]) -> list[Message]:
    """Checked plain copies of `messages`; raises RequestError naming the bad message."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise RequestError(
            "messages must be a non-empty list of {'role': ..., 'content': ...} dicts",
            param="messages",
        )
    checked = []
    for i, m in enumerate(messages):
        calls = isinstance(m, dict) and m.get("role") == "assistant" and m.get("tool_calls")
        if not isinstance(m, dict) or "role" not in m or ("content" not in m and not calls):
            raise RequestError(
                f"messages[{i}] must be a dict with 'role' and 'content', got {m!r}",
                param="messages",
            )
        if m["role"] not in ROLES:
            raise RequestError(
                f"messages[{i}] has role {m['role']!r}; use one of {', '.join(ROLES)}",
                param="messages",
            )
        content = m.get("content")
        if not isinstance(content, str) and not (calls and content is None):
            raise RequestError(
                f"messages[{i}] content must be a string, got {type(content).__name__}",
                param="messages",
            )
        extra = {k: m[k] for k in TOOL_KEYS if m.get(k) is not None}
        checked.append({"role": str(m["role"]), "content": content or "", **extra})
    return checked


def _special_id(tokenizer: Tokenizer, text: str, family: str) -> int:
    token_id = tokenizer.token_to_id(text)
    if token_id is None:
        raise TokenizerError(
            f"the {family} chat format needs the special token {text} but this tokenizer has none: "
            "pass --chat-template NAME|FILE with a format this model was trained on"
        )
    return token_id


def _leading_bos(tokenizer: Tokenizer) -> list[int]:
    return [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []


class Llama2ChatFormat:
    """Meta's Llama 2 chat: the system prompt goes inside the first user message, and each
    user/assistant pair is BOS + "[INST] {user} [/INST] {answer} " + EOS."""

    name = "llama2"

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.stop_ids = frozenset(tokenizer.stop_ids)

    def encode_dialog(
        self, messages: Sequence[Message], *, add_generation_prompt: bool = True
    ) -> list[int]:
        dialog = validate_messages(messages)
        if dialog[0]["role"] == "system":
            if len(dialog) < 2:
                raise RequestError(
                    "the Llama 2 chat format needs a user message after the system message",
                    param="messages",
                )
            dialog = [
                {
                    "role": dialog[1]["role"],
                    "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"],
                }
            ] + dialog[2:]
        for i, m in enumerate(dialog):
            if m["role"] != ("user" if i % 2 == 0 else "assistant"):
                raise RequestError(
                    "the Llama 2 chat format needs an optional system message, then user and assistant "
                    f"messages alternating starting with user; message {i} is {m['role']!r}",
                    param="messages",
                )
        if add_generation_prompt and dialog[-1]["role"] != "user":
            raise RequestError(
                "the last message must be from the user to generate an answer", param="messages"
            )
        tok = self.tokenizer
        ids: list[int] = []
        for user, answer in zip(dialog[::2], dialog[1::2]):
            ids += tok.encode(
                f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} ",
                bos=True,
                eos=True,
            )
        if dialog[-1]["role"] == "user":
            ids += tok.encode(
                f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False
            )
        return ids


class Llama3ChatFormat:
    """Meta's Llama 3 ChatFormat: <|begin_of_text|>, then per message
    <|start_header_id|>role<|end_header_id|>\\n\\n content <|eot_id|>, then the assistant header."""

    name = "llama3"

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.begin_id = _special_id(tokenizer, "<|begin_of_text|>", "Llama 3")
        self.start_header_id = _special_id(tokenizer, "<|start_header_id|>", "Llama 3")
        self.end_header_id = _special_id(tokenizer, "<|end_header_id|>", "Llama 3")
        self.eot_id = _special_id(tokenizer, "<|eot_id|>", "Llama 3")
        self.stop_ids = frozenset(tokenizer.stop_ids) | {self.eot_id}

    def _header(self, role: str) -> list[int]:
        tok = self.tokenizer
        return [
            self.start_header_id,
            *tok.encode(role, bos=False),
            self.end_header_id,
            *tok.encode("\n\n", bos=False),
        ]

    def encode_dialog(
        self, messages: Sequence[Message], *, add_generation_prompt: bool = True
    ) -> list[int]:
        ids = [self.begin_id]
        for m in validate_messages(messages):
            ids += (
                self._header(m["role"])
                + self.tokenizer.encode(m["content"].strip(), bos=False)
                + [self.eot_id]
            )
        if add_generation_prompt:
            ids += self._header("assistant")
        return ids


class ChatMLFormat:
    """ChatML: <|im_start|>role\\ncontent<|im_end|>\\n per message, then <|im_start|>assistant\\n."""

    name = "chatml"

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.im_start_id = _special_id(tokenizer, "<|im_start|>", "ChatML")
        self.im_end_id = _special_id(tokenizer, "<|im_end|>", "ChatML")
        self.stop_ids = frozenset(tokenizer.stop_ids) | {self.im_end_id}

    def encode_dialog(
        self, messages: Sequence[Message], *, add_generation_prompt: bool = True
    ) -> list[int]:
        tok = self.tokenizer
        newline = tok.encode("\n", bos=False)
        ids = _leading_bos(tok)
        for m in validate_messages(messages):
            ids += [
                self.im_start_id,
                *tok.encode(f"{m['role']}\n{m['content']}", bos=False),
                self.im_end_id,
                *newline,
            ]
        if add_generation_prompt:
            ids += [self.im_start_id, *tok.encode("assistant\n", bos=False)]
        return ids


class JinjaChatFormat:
    """A Jinja chat template rendered as transformers' apply_chat_template does, then encoded with
    special tokens parsed. BOS is added only when the tokenizer wants one and the text lacks it."""

    name = "jinja"

    def __init__(self, tokenizer: Tokenizer, template: str, *, source: str = "the checkpoint"):
        self.tokenizer = tokenizer
        self.template = template
        self.source = source
        self._compiled = compile_template(template, source)
        self.special_tokens = special_token_texts(tokenizer)
        turn_ends = {
            t for t in END_OF_TURN if t in template and tokenizer.token_to_id(t) is not None
        }
        self.stop_ids = frozenset(tokenizer.stop_ids) | {
            tokenizer.token_to_id(t) for t in turn_ends
        }

    def render(
        self,
        messages: Sequence[Message],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
    ) -> str:
        """tools: OpenAI's function tools, as apply_chat_template(tools=...) receives them."""
        try:
            return self._compiled.render(
                messages=validate_messages(messages),
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except jinja2.TemplateError as e:
            raise RequestError(
                f"the chat template from {self.source} refused these messages: {e}",
                param="messages",
            ) from e

    def encode_dialog(
        self,
        messages: Sequence[Message],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
    ) -> list[int]:
        text = self.render(messages, add_generation_prompt=add_generation_prompt, tools=tools)
        tok = self.tokenizer
        bos_text = self.special_tokens.get("bos_token")
        writes_bos = bool(bos_text) and text.startswith(bos_text)
        return ([] if writes_bos else _leading_bos(tok)) + tok.encode(text, bos=False, special=True)


def special_token_texts(tokenizer: Tokenizer) -> dict[str, str]:
    """bos_token / eos_token / unk_token / pad_token as the template sees them (absent ones left out)."""
    ids = {
        "bos_token": tokenizer.bos_id,
        "eos_token": tokenizer.eos_id,
        "pad_token": tokenizer.pad_id,
        "unk_token": getattr(tokenizer, "unk_id", None),
    }
    texts = {}
    for name, token_id in ids.items():
        text = token_text(tokenizer, token_id)
        if text is not None:
            texts[name] = text
    return texts


def token_text(tokenizer: Tokenizer, token_id: int | None) -> str | None:
    """The text of a (special) token id, such that token_to_id(text) == token_id; None if unknown."""
    if token_id is None or token_id < 0:
        return None
    candidates = [tokenizer.decode([token_id]), *_SPECIAL_NAMES]
    return next((t for t in candidates if t and tokenizer.token_to_id(t) == token_id), None)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller) -> str:
        return caller()


@lru_cache(maxsize=16)
def compile_template(template: str, source: str = "the checkpoint"):
    """Compile like transformers: sandboxed, trim_blocks + lstrip_blocks, loop controls,
    raise_exception, strftime_now and a tojson that does not escape HTML."""

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(
            f"the chat template from {source} is not valid Jinja (line {e.lineno}: {e.message}); "
            "pass --chat-template NAME|FILE with a working one"
        ) from e


FORMATS = {"llama2": Llama2ChatFormat, "llama3": Llama3ChatFormat, "chatml": ChatMLFormat}


def get_chat_format(
    tokenizer: Tokenizer, chat_template: str | None, override: str | None = None
) -> ChatFormat:
    """The chat format: `override` (a name in FORMATS, a Jinja file, or Jinja source), else the
    checkpoint's own template, else one inferred from the tokenizer's special tokens."""
    if override is not None:
        if override in FORMATS:
            return FORMATS[override](tokenizer)
        if "{{" in override or "{%" in override:
            return JinjaChatFormat(tokenizer, override, source="the given template")
        path = Path(override).expanduser()
        if not path.is_file():
            raise RequestError(
                f"--chat-template {override!r} is neither a template file nor a format name; "
                f"use a Jinja file or one of {', '.join(FORMATS)}",
                param="chat_template",
            )
        return JinjaChatFormat(tokenizer, path.read_text(encoding="utf-8"), source=str(path))
    if chat_template:
        return JinjaChatFormat(tokenizer, chat_template)
    if (
        tokenizer.token_to_id("<|start_header_id|>") is not None
        and tokenizer.token_to_id("<|eot_id|>") is not None
    ):
        return Llama3ChatFormat(tokenizer)
    if (
        tokenizer.token_to_id("<|im_start|>") is not None
        and tokenizer.token_to_id("<|im_end|>") is not None
    ):
        return ChatMLFormat(tokenizer)
    raise TokenizerError(
        "this model has no chat template and no chat tokens, so it looks like a base model that only "
        "continues text: use `llamarun generate`, or pass --chat-template NAME|FILE "
        f"(NAME: {', '.join(FORMATS)}) if it was trained on one"
    )


def meta_chat_format(tokenizer: Tokenizer, chat_template: str | None) -> ChatFormat:
    """The format Meta's chat_completion uses: Llama 2 for SentencePiece tokenizers (a Llama 2 chat
    checkpoint has no template), Llama 3 for Llama 3's tokenizer, else the checkpoint's own."""
    if tokenizer.adds_dummy_prefix:
        return Llama2ChatFormat(tokenizer)
    if tokenizer.token_to_id("<|start_header_id|>") is not None:
        return Llama3ChatFormat(tokenizer)
    return get_chat_format(tokenizer, chat_template)


def has_special_tags(messages: Sequence[Message]) -> bool:
    """Meta's Llama 2 check: a message that contains [INST] or <<SYS>> tags is refused."""
    return any(tag in m["content"] for tag in SPECIAL_TAGS for m in messages)
