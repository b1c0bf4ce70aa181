"""The engine: slots over one static KV cache, prefill once per prompt, one decode step per token.

`Engine` is what both faces use: `LLM` (native API, CLI) and the server's continuous batching.
Each batch row is a slot with its own position, sampling parameters and seeded generator, so a
row's tokens do not depend on which other rows share the batch.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch

from .cpu_step import CpuStep, argmax_ids
from .device import as_token_ids
from .errors import RequestError
from .model import Transformer
from .sampling import SamplingParams, apply_penalties, sample
from .tokenizer import Tokenizer
from .tokenizer.chat import ChatFormat, Message, get_chat_format
from .tokenizer.stream import StreamDecoder

DEFAULT_PARAMS = SamplingParams()  # frozen, so safe as a shared default
PREFILL_CHUNK = 512  # prompt tokens per forward: bounds attention memory for long prompts


@dataclass
class Slot:
    params: SamplingParams
    generator: torch.Generator
    prompt_len: int
    pos: int  # next cache position to write
    tokens: list[int]  # prompt + generated
    logprobs: int | None = None  # how many top alternatives to report; None: no logprobs
    finish_reason: str | None = None

    @property
    def n_generated(self) -> int:
        return len(self.tokens) - self.prompt_len


@dataclass
class StepOutput:
    slot: int
    token_id: int
    finish_reason: str | None  # "stop", "length" or None while running
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


class Engine:
    """Owns the model's cache rows. Not thread-safe: one thread drives it."""

    def __init__(self, model: Transformer, stop_ids: frozenset[int], *, compile: bool = False):
        self.model = model
        self.stop_ids = stop_ids
        self.device = model.norm.weight.device
        self.slots: list[Slot | None] = [None] * model.max_batch_size
        if self.device.type == "cpu":  # float32 matrix-vector products on the C++ kernels
            from .quantize import use_cpu_kernels_

            use_cpu_kernels_(model)
        # On CUDA, "reduce-overhead" replays the static-cache decode step as a CUDA graph. On CPU
        # the default is the whole step in one C++ call (CpuStep: ~3x the eager speed at batch 1,
        # and faster than a compiled step, which attends the whole static cache).
        mode = "reduce-overhead" if self.device.type == "cuda" else None
        self._decode = torch.compile(model, mode=mode, dynamic=False) if compile else model
        if self.device.type == "cpu" and not compile:
            self._decode = CpuStep.build(model) or model

    @property
    def max_seq_len(self) -> int:
        return self.model.max_seq_len

    def free_slots(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s is None]

    def check_prompt(self, prompt_ids: Sequence[int]) -> None:
        vocab = self.model.args.vocab_size
        if not prompt_ids:
            raise RequestError("the prompt is empty: give at least one token", param="prompt")
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise RequestError(
                f"prompt has token ids outside the vocabulary (0..{vocab - 1})", param="prompt"
            )
        if len(prompt_ids) >= self.max_seq_len:
            raise RequestError(
                f"the prompt has {len(prompt_ids)} tokens but max_seq_len is {self.max_seq_len}: "
                "shorten the prompt or raise --max-seq-len",
                param="prompt",
            )

    @torch.inference_mode()
    def add(
        self,
        slot: int,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        logprobs: int | None = None,
    ) -> StepOutput:
        """Prefill `prompt_ids` into a free slot and sample its first new token."""
        self.check_prompt(prompt_ids)
        assert self.slots[slot] is None, f"slot {slot} is busy"
        seed = params.seed if params.seed is not None else random.randrange(2**63)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        state = Slot(params, generator, len(prompt_ids), 0, list(prompt_ids), logprobs)
        self.slots[slot] = state
        rows = torch.tensor([slot], device=self.device)
        for start in range(0, len(prompt_ids), PREFILL_CHUNK):
            chunk = prompt_ids[start : start + PREFILL_CHUNK]
            tokens = torch.tensor([chunk], device=self.device)
            input_pos = torch.arange(start, start + len(chunk), device=self.device)[None]
            logits = self.model(tokens, input_pos, rows)  # (1, V)
        state.pos = len(prompt_ids)
        if params.max_new_tokens == 0:
            state.finish_reason = "length"
            return StepOutput(slot, -1, "length")
        return self._pick(slot, logits[0])

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """One decode step for every running slot."""
        running = [i for i, s in enumerate(self.slots) if s is not None and s.finish_reason is None]
        if not running:
            return []
        hi = running[-1] + 1  # rows 0..hi-1 are a view of the cache; idle rows decode a dummy token
        # Idle rows decode token 0 at position 0: a later prefill of the row overwrites it first,
        # and the attended length (the batch's furthest position) does not grow.
        live = [s if s is not None and s.finish_reason is None else None for s in self.slots[:hi]]
        tokens = torch.tensor([[s.tokens[-1] if s else 0] for s in live], device=self.device)
        input_pos = torch.tensor([[s.pos if s else 0] for s in live], device=self.device)
        logits = self.decode(tokens, input_pos)  # (hi, V)
        for i in running:
            self.slots[i].pos += 1
        return self._pick_many(running, logits)

    def decode(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) for one new token per cache row 0..B-1: tokens and input_pos (B, 1).
        The fastest path this device has (CpuStep, a compiled step, or the model)."""
        return self._decode(tokens, input_pos)

    def release(self, slot: int) -> Slot | None:
        state, self.slots[slot] = self.slots[slot], None
        return state

    def _pick_many(self, running: list[int], logits: torch.Tensor) -> list[StepOutput]:
        states = [self.slots[i] for i in running]
        if all(
            s.params.is_greedy and not s.params.has_penalties and s.logprobs is None for s in states
        ):
            ids = argmax_ids(logits)  # one host sync for the whole batch
            return [self._advance(i, ids[i]) for i in running]
        return [self._pick(i, logits[i]) for i in running]

    def _pick(self, slot: int, logits: torch.Tensor) -> StepOutput:
        s = self.slots[slot]
        if s.params.has_penalties:
            seen = torch.tensor(s.tokens, device=logits.device)
            logits = apply_penalties(logits, s.params, seen, seen[s.prompt_len :])
        token = sample(logits[None], s.params, s.generator)
        if s.logprobs is None:
            return self._advance(slot, int(token))
        logp = torch.log_softmax(logits.float(), dim=-1)
        top = torch.topk(logp, s.logprobs) if s.logprobs else None
        out = self._advance(slot, int(token))
        out.logprob = float(logp[out.token_id])
        if top is not None:
            out.top_logprobs = list(zip(top.indices.tolist(), top.values.tolist()))
        return out

    def _advance(self, slot: int, token_id: int) -> StepOutput:
        s = self.slots[slot]
        s.tokens.append(token_id)
        if token_id in self.stop_ids:
            s.finish_reason = "stop"
        elif s.n_generated >= s.params.max_new_tokens or s.pos >= self.max_seq_len:
            s.finish_reason = "length"
        return StepOutput(slot, token_id, s.finish_reason)


class TextStream:
    """Token ids of one row -> text pieces, holding back text that may begin a stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), *, lstrip: bool = False):
        self.decoder = StreamDecoder(tokenizer, lstrip=lstrip)
        self.stop = tuple(stop)
        self.pending = ""
        self.text = ""  # everything emitted so far
        self.stopped = False

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
            hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
            if hits:
                out, self.pending, self.stopped = self.pending[: min(hits)], "", True
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
    """One finished row: its new token ids, text and why it ended ("stop" or "length")."""

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

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tps(self) -> float:
        # the first new token comes from the prefill; the rest from decode steps
        decoded = max(self.new_tokens - 1, 0)
        return decoded / self.decode_s if self.decode_s else 0.0


class LLM:
    """A loaded model with its tokenizer, ready to generate. Build it with `llamarun.load()`."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer | None,
        *,
        chat_template: str | None = None,
        compile: bool = False,
        info: dict | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.info = info or {}
        stop_ids = tokenizer.stop_ids if tokenizer is not None else frozenset()
        self.engine = Engine(model, stop_ids, compile=compile)
        self.last_stats = Stats()

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
        """Yield one new token id per prompt per step (None once that prompt has finished)."""
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
            first = [engine.add(i, p, sp) for i, (p, sp) in enumerate(zip(prompts, params_list))]
            stats.prefill_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            row = [o.token_id if o.token_id >= 0 else None for o in first]
            stats.new_tokens = sum(t is not None for t in row)
            if any(t is not None for t in row):
                yield row
            while True:
                outs = engine.step()
                if not outs:
                    break
                row = [None] * len(prompts)
                for o in outs:
                    row[o.slot] = o.token_id
                stats.new_tokens += len(outs)
                stats.decode_s = time.perf_counter() - t0
                yield row
        finally:
            for i in range(len(prompts)):
                engine.release(i)

    def complete_batch(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams = DEFAULT_PARAMS,
        *,
        on_text=None,
    ) -> list[Completion]:
        """Complete several prompts as one batch. `on_text(row, piece)` receives text as it streams."""
        tok = self._need_tokenizer()
        ids = [self.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        streams = [TextStream(tok, params.stop) for _ in ids]
        new_ids: list[list[int]] = [[] for _ in ids]
        reasons: list[str | None] = [None] * len(ids)
        gen = self.generate(ids, params)
        for row in gen:
            for i, token in enumerate(row):
                if token is None or reasons[i] is not None:
                    continue
                if token in tok.stop_ids:
                    reasons[i] = "stop"
                    continue
                new_ids[i].append(token)
                piece = streams[i].feed(token)
                if piece and on_text:
                    on_text(i, piece)
                if streams[i].stopped:
                    reasons[i] = "stop"
            if all(r is not None for r in reasons):
                gen.close()
                break
        results = []
        for i, stream in enumerate(streams):
            tail = stream.finish()
            if tail and on_text:
                on_text(i, tail)
            results.append(Completion(new_ids[i], stream.text, reasons[i] or "length", len(ids[i])))
        return results

    def stream(
        self, prompt: str | Sequence[int], params: SamplingParams = DEFAULT_PARAMS
    ) -> Iterator[str]:
        """Yield the completion of one prompt as text pieces."""
        tok = self._need_tokenizer()
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return self._stream_ids(ids, params, tok.stop_ids)

    def _stream_ids(
        self,
        ids: list[int],
        params: SamplingParams,
        stop_ids: frozenset[int],
        *,
        lstrip: bool = False,
    ) -> Iterator[str]:
        """Text pieces of one row until a stop id, a stop string or the token budget."""
        text = TextStream(self._need_tokenizer(), params.stop, lstrip=lstrip)
        gen = self.generate([ids], params)
        try:
            for (token,) in gen:
                if token is None or token in stop_ids:
                    break
                piece = text.feed(token)
                if piece:
                    yield piece
                if text.stopped:
                    break
        finally:
            gen.close()
        tail = text.finish()
        if tail:
            yield tail

    def complete(self, prompt: str | Sequence[int], params: SamplingParams = DEFAULT_PARAMS) -> str:
        return "".join(self.stream(prompt, params))

    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            from .errors import TokenizerError

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
        tok = self._need_tokenizer()
        fmt = self.chat_format
        if chat_template is not None:
            fmt = get_chat_format(tok, self.chat_template, chat_template)
        return self._stream_ids(fmt.encode_dialog(messages), params, fmt.stop_ids, lstrip=True)

    def chat(
        self,
        messages: Sequence[Message],
        params: SamplingParams = DEFAULT_PARAMS,
        *,
        chat_template: str | None = None,
    ) -> str:
        """The assistant's answer to `messages` (a list of {"role", "content"} dicts)."""
        return "".join(self.chat_stream(messages, params, chat_template=chat_template))
