"""`llamarun chat [MODEL]`: talk to a chat model.

On a terminal: streams each answer, keeps the history (dropping the oldest turns, with a notice,
when it outgrows the context), /reset, /exit or Ctrl-D to leave, Ctrl-C to stop an answer.
With piped stdin: one message per line, one answer per message. With -p: one answer, then exit.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import LlamarunError, RequestError
from ..tokenizer.chat import get_chat_format
from . import (
    add_model_args,
    add_sampling_args,
    add_speculation_args,
    load_from_args,
    sampling_params,
)

HELP = "/reset clears the history, /exit or Ctrl-D leaves, Ctrl-C stops an answer"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    add_speculation_args(parser)
    parser.add_argument("--system", default=None, metavar="TEXT", help="system prompt")
    parser.add_argument("-p", "--prompt", default=None, metavar="TEXT", help="answer once and exit")
    parser.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE|NAME",
        help="Jinja template file, or llama2, llama3, chatml (default: the checkpoint's own)",
    )
    add_sampling_args(parser, temperature=0.7)


def run(args: argparse.Namespace) -> int:
    llm = load_from_args(args)
    # fail now, before the first message, if the model has no chat format
    llm.chat_format = get_chat_format(llm._need_tokenizer(), llm.chat_template, args.chat_template)
    chat = Chat(llm, sampling_params(args), system=args.system)
    if args.prompt is not None:
        chat.answer(args.prompt)
        return 0
    if sys.stdin.isatty():
        return chat.interactive()
    for line in sys.stdin:  # scriptable: one message per line, one answer per message
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            chat.reset()
        elif text:
            chat.answer(text)
    return 0


class Chat:
    """One conversation: the history, and how each answer is produced and printed."""

    def __init__(self, llm, params, *, system: str | None = None, out=None, err=None):
        self.llm = llm
        self.params = params
        self.system = [{"role": "system", "content": system}] if system else []
        self.history = list(self.system)
        self.out = out or sys.stdout
        self.err = err or sys.stderr

    def reset(self) -> None:
        self.history = list(self.system)

    def answer(self, text: str) -> str:
        """Stream the answer to `text` to stdout, then add both turns to the history.
        Ctrl-C (KeyboardInterrupt) stops the answer; what was said so far is kept."""
        messages = self.fit([*self.history, {"role": "user", "content": text}])
        pieces = []
        stream = self.llm.chat_stream(messages, self.params)
        try:
            for piece in stream:
                pieces.append(piece)
                self.out.write(piece)
                self.out.flush()
        except KeyboardInterrupt:
            self.err.write("\n[answer stopped]")
        finally:
            stream.close()
            self.out.write("\n")
            self.out.flush()
        reply = "".join(pieces)
        self.history = [*messages, {"role": "assistant", "content": reply}]
        return reply

    def fit(self, messages: list[dict]) -> list[dict]:
        """Drop the oldest turns (never the system prompt) until the prompt plus room for an answer
        fits the context, saying so on stderr."""
        limit = self.llm.max_seq_len
        room = min(self.params.max_new_tokens, limit // 2)
        keep = len(self.system)
        dropped = 0
        while len(self.llm.chat_format.encode_dialog(messages)) + room > limit:
            if len(messages) - keep <= 1:
                raise RequestError(
                    f"this message does not fit the context of {limit} tokens with room for a "
                    f"{room}-token answer: shorten it, lower --max-new-tokens or raise --max-seq-len",
                    param="messages",
                )
            # a turn is a user message and the answer after it
            end = keep + 1
            while end < len(messages) - 1 and messages[end]["role"] != "user":
                end += 1
            dropped += end - keep
            messages = messages[:keep] + messages[end:]
        if dropped:
            self.err.write(
                f"[context full ({limit} tokens): dropped the oldest {dropped} message(s)]\n"
            )
            self.err.flush()
        return messages

    def interactive(self) -> int:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        self.err.write(f"Chatting with {self.llm.info.get('path', 'the model')}. {HELP}.\n")
        while True:
            try:
                text = input(">>> ").strip()
            except EOFError:
                self.out.write("\n")
                return 0
            except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh prompt, as in Python's REPL
                self.out.write("\n")
                continue
            if text in ("/exit", "/quit", "/bye"):
                return 0
            if text == "/reset":
                self.reset()
                self.err.write("[history cleared]\n")
            elif text in ("/help", "/?"):
                self.err.write(HELP + "\n")
            elif text:
                self._answer_or_report(text)

    def _answer_or_report(self, text: str) -> None:
        try:
            self.answer(text)
        except LlamarunError as e:  # a message that cannot be answered does not end the session
            self.err.write(f"llamarun: error: {e}\n")
        except KeyboardInterrupt:  # Ctrl-C before the answer began streaming
            self.err.write("\n[answer stopped]\n")
