"""LLM: a loaded model with its tokenizer, as text in and text out (native API and CLI), and
TextStream, the one place that turns a row's tokens into text and settles why the row ended.

The Engine (engine.py) ends a row on a token (a stop id, the budget, the context's end);
TextStream adds the stop strings, which are text: it holds back text that may begin one and cuts
it when it appears. complete_batch, stream, chat and the server all read rows through it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import overload

import torch

from .device import as_token_ids
from .engine import Decode, Engine, Forward, StepOutput
from .errors import RequestError, TokenizerError
from .model import Transformer
from .prefix_cache import block_bytes, default_bytes
from .sampling import SamplingParams
from .speculate import Speculator
from .tokenizer import Tokenizer
from .tokenizer.chat import ChatFormat, Message, get_chat_format
from .tokenizer.stream import StreamDecoder
from .tools import ChatResponse, finish_reason, prepare_chat, tool_request

DEFAULT_PARAMS = SamplingParams()  # frozen, so safe as a shared default


class TextStream:
    """Token ids of one row -> text pieces, holding back text that may begin a stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), *, lstrip: bool = False):
        self.decoder = StreamDecoder(tokenizer, lstrip=lstrip)
        self.stop = tuple(stop)
        self.pending = ""
        self.text = ""  # everything emitted so far
        self.stopped = False  # a stop string appeared
        self.stop_string: str | None = None  # which one
        self.finish_reason: str | None = None  # set once the row has ended, for any reason

    def push(self, out: StepOutput) -> str:
        """The text one engine output adds. Sets `finish_reason` when the row ends: "stop" for a
        stop id (never shown), a stop string (cut) or a complete grammar, "length" when the
        budget ran out; the held back text is then flushed."""
        if self.finish_reason is not None:
            return ""
        text = ""
        if out.shown_id is not None:
            text = self.feed(out.shown_id)
            if self.stopped:
                self.finish_reason = "stop"
                return text
        if out.finish_reason is not None:
            self.finish_reason = out.finish_reason
            text += self.finish()
        return text

    def feed(self, token_id: int | None) -> str:
        """Returns the text now safe to emit; sets `stopped` when a stop string appeared."""
        if self.stopped:
            return ""
        self.pending += (
            self.decoder.feed(token_id) if token_id is not None else self.decoder.flush()
        )
        if not self.stop:
            out, self.pending = self.pending, ""
        else:
            hits = [(i, s) for s in self.stop if (i := self.pending.find(s)) >= 0]
            if hits:
                cut, self.stop_string = min(hits, key=lambda hit: hit[0])
                out, self.pending, self.stopped = self.pending[:cut], "", True
            else:
                keep = max(
                    (
                        k
                        for s in self.stop
                        for k in range(1, len(s))
                        if self.pending.endswith(s[:k])
                    ),
                    default=0,
                )
                cut = len(self.pending) - keep
                out, self.pending = self.pending[:cut], self.pending[cut:]
        self.text += out
        return out

    def finish(self) -> str:
        out = self.feed(None)
        if not self.stopped:
            out += self.pending
            self.text += self.pending
            self.pending = ""
        return out


@dataclass
class Completion:
    """One finished row: its new token ids (stop id excluded), text and why it ended ("stop" or
    "length")."""

    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int


@dataclass
class Stats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    cached_tokens: int = 0  # prompt tokens the prefix cache held, so not prefilled

    @property
    def prefill_tps(self) -> float:
        prefilled = self.prompt_tokens - self.cached_tokens
        return prefilled / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tps(self) -> float:
        # the first new token comes from the prefill; the rest from decode steps
        decoded = max(self.new_tokens - 1, 0)
        return decoded / self.decode_s if self.decode_s else 0.0


class LLM:
    """A loaded model with its tokenizer, ready to generate. Build it with `llamarun.load()`, or
    wrap a model of your own with `llamarun.build.prepare()`. LLM never changes the model: it
    decodes with `decode` and runs prompts with `forward` (default: the model's own forward).
    prefix_cache_bytes bounds the saved prompt prefixes a new prompt may start from (None: as
    large as the KV cache, up to 256 MB; 0: every prompt is prefilled whole). `on_close` runs at
    `close()` (a distributed run releases its other ranks there). `speculator`: speculative
    decoding for a prompt running alone (speculate.py)."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer | None,
        *,
        chat_template: str | None = None,
        decode: Decode | None = None,
        forward: Forward | None = None,
        info: dict | None = None,
        prefix_cache_bytes: int | None = None,
        on_close: Callable[[], None] | None = None,
        speculator: Speculator | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.info = info or {}
        stop_ids = tokenizer.stop_ids if tokenizer is not None else frozenset()
        if prefix_cache_bytes is None and not model.max_seq_len:
            prefix_cache_bytes = 0  # no cache rows yet (setup_caches): nothing to reuse either
        if prefix_cache_bytes is None:
            rows = model.max_batch_size * model.max_seq_len
            caches = (layer.attention.kv_cache for layer in model.layers)
            prefix_cache_bytes = default_bytes(sum(block_bytes(c, rows) for c in caches))
        self.engine = Engine(
            model,
            stop_ids,
            decode=decode,
            forward=forward,
            tokenizer=tokenizer,
            prefix_cache_bytes=prefix_cache_bytes,
            speculator=speculator,
        )
        self.last_stats = Stats()
        self._on_close = on_close

    def close(self) -> None:
        """Release what this LLM holds beyond the process: in a distributed run, the other ranks
        (their `load()` returns); nothing otherwise. The LLM cannot generate afterwards."""
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()

    @property
    def max_batch_size(self) -> int:
        return self.model.max_batch_size

    @property
    def max_seq_len(self) -> int:
        return self.model.max_seq_len

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def encode(self, text: str, *, bos: bool | None = None) -> list[int]:
        tok = self._need_tokenizer()
        return tok.encode(text, bos=tok.add_bos if bos is None else bos)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] = DEFAULT_PARAMS,
    ) -> Iterator[list[int | None]]:
        """Yield one new token id per prompt per step (None once that prompt has finished, or
        while a speculative step gives another prompt several)."""
        for outs in self._run(prompts, params):
            yield [o.token_id if o is not None else None for o in outs]

    def _run(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] = DEFAULT_PARAMS,
        stop_ids: frozenset[int] = frozenset(),
    ) -> Iterator[list[StepOutput | None]]:
        """The engine's outputs for a batch, one list per step (None for rows already done)."""
        prompts = [as_token_ids(p) for p in prompts]  # lists, or tensors on any device
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(prompts) > self.max_batch_size:
            raise RequestError(
                f"{len(prompts)} prompts but max_batch_size is {self.max_batch_size}: "
                "pass fewer prompts or load with a larger max_batch_size",
                param="max_batch_size",
            )
        for p in prompts:
            self.engine.check_prompt(p)
        stats = self.last_stats = Stats(prompt_tokens=sum(map(len, prompts)))
        engine = self.engine
        for i in range(len(prompts)):
            if engine.slots[i] is not None:
                engine.release(i)
        try:
            t0 = time.perf_counter()
            first = [
                engine.add(i, p, sp, stop_ids=stop_ids)
                for i, (p, sp) in enumerate(zip(prompts, params_list))
            ]
            stats.prefill_s = time.perf_counter() - t0
            stats.cached_tokens = sum(engine.slots[i].cached_tokens for i in range(len(prompts)))
            t0 = time.perf_counter()
            row: list[StepOutput | None] = [o if o.token_id >= 0 else None for o in first]
            stats.new_tokens = sum(o is not None for o in row)
            if any(o is not None for o in row):
                yield row
            while True:
                outs = engine.step()
                if not outs:
                    break
                stats.new_tokens += len(outs)
                stats.decode_s = time.perf_counter() - t0
                yield from _rows(outs, len(prompts))
        finally:
            for i in range(len(prompts)):
                engine.release(i)

    @property
    def speculation(self) -> dict | None:
        """Speculative decoding's figures so far (method, rounds, acceptance_rate,
        tokens_per_forward, ...), or None without it."""
        spec = self.engine.speculator
        return None if spec is None else {"method": spec.describe(), **spec.stats.as_dict()}

    def complete_batch(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams = DEFAULT_PARAMS,
        *,
        on_text: Callable[[int, str], None] | None = None,
        stop_ids: frozenset[int] = frozenset(),
        lstrip: bool = False,
    ) -> list[Completion]:
        """Complete several prompts as one batch. `on_text(row, piece)` receives text as it
        streams. stop_ids end a row besides the model's own; lstrip: the text starts a turn."""
        tok = self._need_tokenizer()
        ids = [self.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        streams = [TextStream(tok, params.stop, lstrip=lstrip) for _ in ids]
        new_ids: list[list[int]] = [[] for _ in ids]
        gen = self._run(ids, params, stop_ids)
        for row in gen:
            for i, out in enumerate(row):
                stream = streams[i]
                if out is None or stream.finish_reason is not None:
                    continue
                if out.shown_id is not None:
                    new_ids[i].append(out.shown_id)
                piece = stream.push(out)
                if piece and on_text:
                    on_text(i, piece)
            if all(s.finish_reason is not None for s in streams):
                gen.close()
                break
        results = []
        for i, stream in enumerate(streams):
            tail = stream.finish()
            if tail and on_text:
                on_text(i, tail)
            reason = stream.finish_reason or "length"
            results.append(Completion(new_ids[i], stream.text, reason, len(ids[i])))
        return results

    def stream(
        self, prompt: str | Sequence[int], params: SamplingParams = DEFAULT_PARAMS
    ) -> Iterator[str]:
        """Yield the completion of one prompt as text pieces."""
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return self._stream_ids(ids, params)

    def _stream_ids(
        self,
        ids: list[int],
        params: SamplingParams,
        stop_ids: frozenset[int] = frozenset(),
        *,
        lstrip: bool = False,
    ) -> Iterator[str]:
        """Text pieces of one row until a stop id, a stop string or the token budget."""
        text = TextStream(self._need_tokenizer(), params.stop, lstrip=lstrip)
        gen = self._run([ids], params, stop_ids)
        try:
            for (out,) in gen:
                piece = text.push(out) if out is not None else ""
                if piece:
                    yield piece
                if out is None or text.finish_reason is not None:
                    break
        finally:
            gen.close()
        tail = text.finish()
        if tail:
            yield tail

    def complete(self, prompt: str | Sequence[int], params: SamplingParams = DEFAULT_PARAMS) -> str:
        return "".join(self.stream(prompt, params))

    def perplexity(
        self,
        ids: Sequence[int],
        ctx: int,
        *,
        max_chunks: int | None = None,
        on_chunk: Callable[[int, float, int], None] | None = None,
    ) -> tuple[float, int, int]:
        """(summed NLL in nats, tokens scored, chunks) over `ids`, as llama.cpp's llama-perplexity
        computes it: non-overlapping chunks of `ctx` tokens (the first of each replaced by BOS when
        the tokenizer adds one), the second half of each chunk scored. `on_chunk(i, nll, count)`
        sees the running totals."""
        n_chunks = len(ids) // ctx
        if max_chunks is not None:
            n_chunks = min(n_chunks, max_chunks)
        tok = self.tokenizer
        bos = tok.bos_id if tok is not None and tok.add_bos else None
        total, count = 0.0, 0
        for i in range(n_chunks):
            chunk = list(ids[i * ctx : (i + 1) * ctx])
            if bos is not None:
                chunk[0] = bos
            nll, n = self.engine.nll(chunk, ctx // 2)
            total, count = total + nll, count + n
            if on_chunk is not None:
                on_chunk(i, total, count)
        return total, count, n_chunks

    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise TokenizerError(
                "this model was loaded without a tokenizer: pass tokenizer=PATH (CLI: --tokenizer PATH)"
            )
        return self.tokenizer

    @cached_property
    def chat_format(self) -> ChatFormat:
        """The checkpoint's chat format: its own template, else one its special tokens imply."""
        return get_chat_format(self._need_tokenizer(), self.chat_template)

    def chat_stream(
        self,
        messages: Sequence[Message],
        params: SamplingParams = DEFAULT_PARAMS,
        *,
        chat_template: str | None = None,
    ) -> Iterator[str]:
        """Yield the assistant's answer to `messages` as text pieces; the turn ends at any of the
        format's stop ids. chat_template: a format name, a Jinja file or Jinja source overriding
        the checkpoint's."""
        fmt = self._chat_format(chat_template)
        return self._stream_ids(fmt.encode_dialog(messages), params, fmt.stop_ids, lstrip=True)

    def _chat_format(self, override: str | None) -> ChatFormat:
        if override is None:
            return self.chat_format
        return get_chat_format(self._need_tokenizer(), self.chat_template, override)

    @overload
    def chat(
        self,
        messages: Sequence[Message],
        params: SamplingParams = ...,
        *,
        chat_template: str | None = ...,
        tools: None = ...,
    ) -> str: ...

    @overload
    def chat(
        self,
        messages: Sequence[Message],
        params: SamplingParams = ...,
        *,
        chat_template: str | None = ...,
        tools: Sequence[dict],
        tool_choice: str | dict | None = ...,
        parallel_tool_calls: bool | None = ...,
    ) -> ChatResponse: ...

    def chat(
        self,
        messages: Sequence[Message],
        params: SamplingParams = DEFAULT_PARAMS,
        *,
        chat_template: str | None = None,
        tools: Sequence[dict] | None = None,
        tool_choice: str | dict | None = None,
        parallel_tool_calls: bool | None = None,
    ) -> str | ChatResponse:
        """The assistant's answer to `messages` (a list of {"role", "content"} dicts; tool
        results as {"role": "tool", "tool_call_id", "content"}). With `tools` (OpenAI's function
        tools; tool_choice "auto", "none", "required" or {"type": "function", "function":
        {"name": ...}}), a ChatResponse holding the text and the parsed calls."""
        if tools is None:
            return "".join(self.chat_stream(messages, params, chat_template=chat_template))
        fmt = self._chat_format(chat_template)
        request = tool_request(tools, tool_choice, parallel_tool_calls)
        plan = prepare_chat(fmt, self._need_tokenizer(), messages, request, params.guide)
        params = plan.sampling(params)
        (out,) = self.complete_batch(
            [plan.prompt_ids], params, stop_ids=frozenset(fmt.stop_ids), lstrip=True
        )
        if plan.reader is None:
            return ChatResponse(out.text, [], out.finish_reason)
        content, calls = plan.reader.final(out.text)
        return ChatResponse(
            content, plan.reader.ids(calls), finish_reason(out.finish_reason, calls)
        )


def _rows(outs: list[StepOutput], n: int) -> Iterator[list[StepOutput | None]]:
    """One engine step's outputs as rows of one token per prompt: a speculative step gives a
    prompt several tokens, one row each, in order."""
    rows: list[list[StepOutput | None]] = []
    seen = [0] * n
    for o in outs:
        if seen[o.slot] == len(rows):
            rows.append([None] * n)
        rows[seen[o.slot]][o.slot] = o
        seen[o.slot] += 1
    yield from rows
