"""The engine: slots over one static KV cache, prefill once per prompt, one decode step per token.

`Engine` is what every face uses: `LLM` (native API, CLI), the Meta-compatible `Llama`, the
server's continuous batching, perplexity. Each batch row is a slot with its own position,
sampling parameters, seeded generator and stop ids, so a row's tokens do not depend on which
other rows share the batch. The engine decides when a row ends on a token (a stop id, the token
budget, the context, a complete grammar); stop *strings* are text, and llm.TextStream decides
those.

A constrained row (SamplingParams.guide) has a matcher (guided/): each step its token mask is
computed (on a worker thread while the forward pass runs, where a core is free for it) and
applied to the logits before any sampling filter, and the sampled token advances it.

The engine never changes the model it is given: build.py prepares it and hands over the fastest
decode callable it has for that device (the one-call CPU step, a compiled step, or the model).
With a prefix cache (prefix_cache.py) a prompt starts where the rows already hold it.
With a Speculator (speculate.py), a row decoding alone checks a draft of several tokens in one
forward (`_speculate`); with more rows running, or a constrained (guided) row, rows decode plainly.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .cpu import argmax_ids
from .errors import RequestError
from .guided import Constraints, Matcher
from .guided.masks import MaskBatch, overlap_helps
from .model import Transformer
from .prefix_cache import PrefixCache
from .sampling import SamplingParams, penalized, sample
from .speculate import Draft, Speculator, choose
from .tokenizer import Tokenizer

PREFILL_CHUNK = 512  # the most prompt tokens per forward: bounds attention memory for long prompts
# Prefix caching reuses whole chunks (a chunk also ends at a turn's end, see `Engine.chunks`), so
# the size is how finely a long message is reused. On a CPU a forward of 256 tokens ran 8-14%
# faster per token than two of 128 (each forward pays its threads' start-up, and the GGUF prompt
# GEMM unpacks each weight panel once per forward; 512 was no faster again: 110M Q4_0 835 / 949 /
# 951 tok/s, f32 588 / 636 / 674, SmolLM2 Q4_K_M 654 / 713 / 552 over a 512-token prompt); a GPU
# forward of 128 tokens costs nearly what one of 512 does.
DEVICE_PREFILL_CHUNK = {"cpu": 256}
# (tokens, input_pos, rows) -> logits; rows None: cache rows 0..B-1
Decode = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
# called as the model is: (tokens, input_pos, rows, *, all_logits) -> logits
Forward = Callable[..., torch.Tensor]
TopLogprobs = list[tuple[int, float]]  # (token id, logprob), best first


@dataclass
class Slot:
    params: SamplingParams
    generator: torch.Generator
    prompt_len: int
    pos: int  # next cache position to write
    tokens: list[int]  # prompt + generated
    stop_ids: frozenset[int]
    logprobs: int | None = None  # how many top alternatives to report; None: no logprobs
    finish_reason: str | None = None
    cached_tokens: int = 0  # prompt tokens whose cache rows were reused, not prefilled
    matcher: Matcher | None = None  # the grammar state of a constrained row

    @property
    def n_generated(self) -> int:
        return len(self.tokens) - self.prompt_len


@dataclass
class StepOutput:
    slot: int
    token_id: int  # -1 when nothing was sampled (max_new_tokens=0)
    finish_reason: str | None  # "stop" (a stop id, a complete grammar), "length", or None
    logprob: float | None = None
    top_logprobs: TopLogprobs = field(default_factory=list)
    is_stop_id: bool = False  # token_id ended the row and is not part of the text

    @property
    def shown_id(self) -> int | None:
        """The token this output adds to the text, if any."""
        return self.token_id if self.token_id >= 0 and not self.is_stop_id else None


class Engine:
    """Owns the model's cache rows. Not thread-safe: one thread drives it."""

    def __init__(
        self,
        model: Transformer,
        stop_ids: frozenset[int],
        *,
        decode: Decode | None = None,
        forward: Forward | None = None,
        tokenizer: Tokenizer | None = None,
        prefix_cache_bytes: int = 0,
        speculator: Speculator | None = None,
    ):
        """forward: what runs the model (default: the model itself; a distributed run passes the
        driver that hands each batch to the other ranks); decode: the one-token step (default:
        forward); tokenizer: what constrained rows compile their grammars against (None: no
        constraints); prefix_cache_bytes: the pool of saved prompt prefixes (0: no prefix
        caching at all); speculator: drafts and keeps tokens for an unconstrained row decoding
        alone."""
        self.model = model
        self.stop_ids = frozenset(stop_ids)
        self.device = model.norm.weight.device
        self.slots: list[Slot | None] = [None] * model.max_batch_size
        self._forward = forward if forward is not None else model
        self._decode = decode if decode is not None else self._forward
        self.prefill_chunk = prefill_chunk(self.device)
        self.turn_ends = self.stop_ids  # where chunks end; fixed, as reuse rests on the same cuts
        self.prefix = (
            PrefixCache(model, self.chunks, prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        )
        self.prefilled_tokens = 0  # prompt tokens run through the model (reused ones are not)
        self.speculator = speculator
        vocab = model.args.vocab_size
        self.constraints = Constraints(tokenizer, vocab) if tokenizer is not None else None
        self.masks = MaskBatch(vocab, model.max_batch_size, threaded=overlap_helps(self.device))

    def compile(self, params: SamplingParams) -> None:
        """Compile params' constraint now (cached), so a grammar that does not fit the tokenizer
        fails here, before a request is admitted; no-op without one."""
        if params.guide is not None:
            self._constraints().compile(params.guide)

    def _constraints(self) -> Constraints:
        if self.constraints is None:
            raise RequestError(
                "constrained generation needs the model's tokenizer, and this engine has none",
                param="json_schema",
            )
        return self.constraints

    @property
    def max_seq_len(self) -> int:
        return self.model.max_seq_len

    def free_slots(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s is None]

    def pick_slot(self, prompt_ids: Sequence[int]) -> int | None:
        """The free slot to run `prompt_ids` in (the one whose row holds most of it); None if none."""
        free = self.free_slots()
        if not free:
            return None
        return self.prefix.pick(free, prompt_ids) if self.prefix is not None else free[0]

    def forget(self, slots: Sequence[int] | None = None) -> None:
        """Nothing in these cache rows (default: any, and no saved prefix) may be reused: they
        were written outside the engine (Llama.generate), or a benchmark wants a cold start."""
        if self.prefix is not None:
            self.prefix.forget(slots)

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

    def chunks(self, ids: Sequence[int], first: int = 0) -> Iterator[tuple[int, int, bool]]:
        """How a prefill cuts ids[first:] into forwards, `first` being where one of its chunks
        ends: a chunk ends after a turn's end token or at `prefill_chunk` tokens, a rule that
        only looks back, so prompts sharing a start cut it alike (prefix_cache.py rests on it).
        Yields (start, end, whole); whole: ended by the rule, not by the prompt running out."""
        start = first
        for i in range(first, len(ids)):
            if ids[i] in self.turn_ends or i + 1 - start == self.prefill_chunk:
                yield start, i + 1, True
                start = i + 1
        if start < len(ids):
            yield start, len(ids), False

    def prefill(
        self, slot: int, ids: Sequence[int], *, first: int = 0, all_logits: bool = False
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Write ids[first:] into cache row `slot` at positions first.., one chunk (`chunks`)
        per forward, the row holding ids[:first] already. Yields (start, logits) per chunk: the
        chunk's last position (V,), or (T, V) each."""
        rows = torch.tensor([slot], device=self.device)
        for start, end, whole in self.chunks(ids, first):
            chunk = list(ids[start:end])
            tokens = torch.tensor([chunk], device=self.device)
            input_pos = torch.arange(start, end, device=self.device)[None]
            logits = self._forward(tokens, input_pos, rows, all_logits=all_logits)[0]
            self.prefilled_tokens += len(chunk)
            if self.prefix is not None:
                self.prefix.wrote(slot, start, chunk, whole)
            yield start, logits

    @torch.inference_mode()
    def add(
        self,
        slot: int,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        logprobs: int | None = None,
        stop_ids: frozenset[int] = frozenset(),
    ) -> StepOutput:
        """Prefill `prompt_ids` into a free slot and sample its first new token. `stop_ids` end
        this row besides the model's own (a chat format's end-of-turn token)."""
        self.check_prompt(prompt_ids)
        assert self.slots[slot] is None, f"slot {slot} is busy"
        seed = params.seed if params.seed is not None else random.randrange(2**63)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        matcher = self._constraints().matcher(params.guide) if params.guide else None
        state = Slot(
            params,
            generator,
            len(prompt_ids),
            0,
            list(prompt_ids),
            self.stop_ids | stop_ids,
            logprobs,
            matcher=matcher,
        )
        self.slots[slot] = state
        if self.prefix is not None:
            state.cached_tokens = self.prefix.reuse(slot, prompt_ids)
        if matcher is not None and params.max_new_tokens:
            self.masks.start([matcher])  # the first token's mask, while the prompt prefills
        # the last chunk's logits pick the token
        *_, (_, logits) = self.prefill(slot, prompt_ids, first=state.cached_tokens)
        if self.prefix is not None:
            self.prefix.save(slot)
        state.pos = len(prompt_ids)
        if params.max_new_tokens == 0:
            state.finish_reason = "length"
            return StepOutput(slot, -1, "length")
        if matcher is not None:
            self.masks.apply_(logits[None], [0], [state.stop_ids])
        return self._pick(slot, logits)

    @torch.inference_mode()
    def score(
        self, slot: int, ids: Sequence[int], top: int = 0
    ) -> list[tuple[float | None, TopLogprobs]]:
        """Log-probability of each token of `ids` given the ones before it (None for the first),
        with the `top` best alternatives, written through cache row `slot` (which must be free)."""
        self.check_prompt(ids)
        assert self.slots[slot] is None, f"slot {slot} is busy"
        scores: list[tuple[float | None, TopLogprobs]] = [(None, [])]
        for start, logits in self.prefill(slot, ids, all_logits=True):
            logp = torch.log_softmax(logits.float(), -1)
            targets = list(ids[start + 1 : start + len(logits) + 1])  # what each position predicts
            picked = logp[torch.arange(len(targets)), torch.tensor(targets, dtype=torch.long)]
            best = torch.topk(logp[: len(targets)], top) if top else None
            for i, lp in enumerate(picked.tolist()):
                alts = list(zip(best.indices[i].tolist(), best.values[i].tolist())) if best else []
                scores.append((lp, alts))
        return scores

    @torch.inference_mode()
    def nll(self, ids: Sequence[int], first: int) -> tuple[float, int]:
        """Summed negative log-likelihood (nats) of ids[first + 1:], each given the ones before
        it, and how many tokens that is; written through a free cache row."""
        slot = self.free_slots()[0]
        total, count = 0.0, 0
        for start, logits in self.prefill(slot, ids, all_logits=True):
            lo = max(first - start, 0)  # logits at position p predict ids[p + 1]
            hi = min(len(logits), len(ids) - 1 - start)
            if lo >= hi:
                continue
            logp = torch.log_softmax(logits[lo:hi].float(), dim=-1)
            targets = torch.tensor(ids[start + lo + 1 : start + hi + 1], device=logp.device)
            total -= float(logp.gather(1, targets[:, None]).sum())
            count += len(targets)
        return total, count

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """One decode step for every running slot."""
        running = [i for i, s in enumerate(self.slots) if s is not None and s.finish_reason is None]
        if not running:
            return []
        if self.speculator is not None:
            if len(running) == 1 and self.slots[running[0]].matcher is None:  # not a grammar's
                outs = self._speculate(running[0])
                if outs is not None:
                    return outs
            else:
                self.speculator.stats.batched_steps += 1
        # Only running rows decode: an idle row keeps what it holds for a later prompt to reuse,
        # and costs nothing. Rows 0..B-1 go as None (the eager forward's view of the cache);
        # other rows by index: the one-call CPU step reads them in place, the eager forward
        # gathers a copy of them.
        states = [self.slots[i] for i in running]
        tokens = torch.tensor([[s.tokens[-1]] for s in states], device=self.device)
        input_pos = torch.tensor([[s.pos] for s in states], device=self.device)
        rows = (
            None if running[-1] == len(running) - 1 else torch.tensor(running, device=self.device)
        )
        constrained = [j for j, s in enumerate(states) if s.matcher is not None]
        if constrained:  # the masks compute on a worker while the model runs
            self.masks.start([states[j].matcher for j in constrained])
        logits = self.decode(tokens, input_pos, rows)  # (len(running), V)
        if constrained:
            self.masks.apply_(logits, constrained, [states[j].stop_ids for j in constrained])
        for s in states:
            s.pos += 1
        return self._pick_many(running, logits)

    def decode(
        self, tokens: torch.Tensor, input_pos: torch.Tensor, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits (B, V) for one new token per cache row `rows` (B,) (default: rows 0..B-1):
        tokens and input_pos (B, 1). A row may appear several times at consecutive positions:
        every entry's keys and values are written before any is attended, so each position sees
        the ones before it (speculative checks)."""
        return self._decode(tokens, input_pos, rows)

    def _speculate(self, slot: int) -> list[StepOutput] | None:
        """One step of a row running alone with a speculator: draft, check in one forward, keep
        the draft up to the model's first disagreement and the model's token there. None: no
        draft this step (decode plainly)."""
        s = self.slots[slot]
        # a round emits at most k + 1 tokens and writes positions pos..pos + k
        room = min(s.params.max_new_tokens - s.n_generated, self.max_seq_len - s.pos) - 1
        draft = self.speculator.plan(slot, s, room)
        if draft is None:
            return None
        n = len(s.tokens)
        logits = self._verify(slot, [s.tokens[-1], *draft.tokens])  # (k + 1, V)
        outs, kept = self._keep(slot, draft, logits)
        self.speculator.record(slot, s, draft, kept, len(outs), n + kept)
        return outs

    def _verify(self, slot: int, tokens: list[int]) -> torch.Tensor:
        """The model's logits (T, V) at each of `tokens`, written at positions pos.. of the row.
        On CPU through the decode step, one entry per position, as plain decoding runs each: with
        batch-invariant kernels a position's logits are bitwise those plain decoding computes.
        Elsewhere one multi-token forward (a GPU's sums already vary with the batch)."""
        s = self.slots[slot]
        ids = torch.tensor(tokens, device=self.device)
        pos = torch.arange(s.pos, s.pos + len(tokens), device=self.device)
        if self.device.type == "cpu":
            rows = torch.full((len(tokens),), slot, device=self.device)
            return self._decode(ids[:, None], pos[:, None], rows)
        rows = torch.tensor([slot], device=self.device)
        return self._forward(ids[None], pos[None], rows, all_logits=True)[0]

    def _keep(self, slot: int, draft: Draft, logits: torch.Tensor) -> tuple[list[StepOutput], int]:
        """Emit the checked tokens of a round in order, until the first the model rejects (its
        replacement emitted instead) or the row ends; returns them and how many draft tokens were
        kept. Penalties see the tokens kept before each position, as plain decoding would."""
        s = self.slots[slot]
        fast = s.params.is_greedy and not s.params.has_penalties and s.logprobs is None
        best = argmax_ids(logits) if fast else None  # one host sync for the whole round
        outs: list[StepOutput] = []
        kept = 0
        for i in range(len(draft.tokens) + 1):
            proposed = draft.tokens[i] if i < len(draft.tokens) else None
            s.pos += 1
            if fast:
                token = best[i]
                out = self._advance(slot, token)
            else:
                row = penalized(logits[i], s.params, s.tokens, s.prompt_len)
                q = draft.probs[i] if draft.probs is not None and proposed is not None else None
                token = choose(row, s.params, s.generator, proposed, q)
                out = self._emit(slot, token, row)
            outs.append(out)
            kept += token == proposed
            if token != proposed or out.finish_reason is not None:
                break
        return outs, kept

    def release(self, slot: int) -> Slot | None:
        state, self.slots[slot] = self.slots[slot], None
        return state

    def _pick_many(self, running: list[int], logits: torch.Tensor) -> list[StepOutput]:
        """logits[j] belongs to slot running[j]."""
        states = [self.slots[i] for i in running]
        if all(
            s.params.is_greedy and not s.params.has_penalties and s.logprobs is None for s in states
        ):
            ids = argmax_ids(logits)  # one host sync for the whole batch
            return [self._advance(i, ids[j]) for j, i in enumerate(running)]
        return [self._pick(i, logits[j]) for j, i in enumerate(running)]

    def _pick(self, slot: int, logits: torch.Tensor) -> StepOutput:
        s = self.slots[slot]
        logits = penalized(logits, s.params, s.tokens, s.prompt_len)
        token = sample(logits[None], s.params, s.generator)
        return self._emit(slot, int(token), logits)

    def _emit(self, slot: int, token: int, logits: torch.Tensor) -> StepOutput:
        """Advance the row by `token`, with its log-probability under `logits` when asked."""
        s = self.slots[slot]
        if s.logprobs is None:
            return self._advance(slot, token)
        logp = torch.log_softmax(logits.float(), dim=-1)
        top = torch.topk(logp, s.logprobs) if s.logprobs else None
        out = self._advance(slot, token)
        out.logprob = float(logp[out.token_id])
        if top is not None:  # a constrained row's masked tokens (-inf) are no alternatives
            alternatives = zip(top.indices.tolist(), top.values.tolist())
            out.top_logprobs = [(t, lp) for t, lp in alternatives if lp > -float("inf")]
        return out

    def _advance(self, slot: int, token_id: int) -> StepOutput:
        """The one place a row ends on a token: a stop id, a complete grammar, its budget, or the
        context's end."""
        s = self.slots[slot]
        s.tokens.append(token_id)
        is_stop_id = token_id in s.stop_ids
        if is_stop_id:
            s.finish_reason = "stop"
        elif s.matcher is not None and self._consume(s, token_id):
            s.finish_reason = "stop"
        elif s.n_generated >= s.params.max_new_tokens or s.pos >= self.max_seq_len:
            s.finish_reason = "length"
        return StepOutput(slot, token_id, s.finish_reason, is_stop_id=is_stop_id)

    @staticmethod
    def _consume(s: Slot, token_id: int) -> bool:
        """Advance a row's grammar past its token; True when nothing may follow."""
        if not s.matcher.consume(token_id):
            # the mask allows only tokens the grammar takes, unless the vocabulary cannot spell
            # what the grammar needs next (a tokenizer without "{" asked for JSON)
            raise RequestError(
                f"the {s.params.guide.kind} cannot be followed with this model's vocabulary "
                f"({s.matcher.error().splitlines()[0]})",
                param=s.params.guide.kind,
            )
        return s.matcher.is_stopped()


def prefill_chunk(device: torch.device) -> int:
    return DEVICE_PREFILL_CHUNK.get(device.type, PREFILL_CHUNK)
