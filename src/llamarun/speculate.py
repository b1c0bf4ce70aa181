"""Speculative decoding: propose a few tokens cheaply, check them all in one forward of the model.

A decode step of a row running alone asks a drafter for up to k tokens, runs the model once over
the row's last token and the draft (Engine._verify: one read of the weights for k + 1
positions), and keeps the draft up to the first token the model would not have produced, plus
the model's own token there: 1 to k + 1 tokens per forward. The cache row is rolled back by
position alone: the positions past the kept tokens are overwritten by the next forward.

Drafters:
- LookupDrafter (prompt lookup): the tokens that followed the latest earlier occurrence of the
  row's last 3 (else 2) tokens, in the prompt or the text so far; summaries, code edits, quotes
  and RAG answers copy long spans. No model, nothing to roll back.
- ModelDrafter: a smaller model with the same vocabulary and a one-row cache of its own
  (--draft MODEL), or a weight-only quantized copy of the model itself (--draft int4|int8:
  self-speculation) that shares the model's cache rows. The copy writes its keys and values at
  the draft's positions and the model's check overwrites them, layer by layer, before reading
  them, so the cache stays the model's own and the copy never prefills or catches up.

Exactness. Greedy: a draft token is kept only where it is the model's argmax, so the output is
plain greedy decoding's as long as a position's logits do not depend on how many positions run
together: on CPU the check goes through the same one-token step as plain decoding, one entry per
position (batch-invariant kernels make those bitwise equal). Sampling: the standard rejection
scheme (Leviathan et al. 2023, Chen et al. 2023): keep draft token x with probability
min(1, p(x)/q(x)), else draw from max(0, p - q) renormalised, and past a fully kept draft draw
from p; p and q are the model's and the draft's probabilities after the same penalties and
filters (logits_to_probs), and lookup's q is a point mass on its token. Tokens are then
distributed as plain sampling's, though a seed gives other tokens (the generator is drawn in
another order).

k: fixed (speculate_k), or chosen each step from a running estimate a of the chance a draft
token is kept: k maximises the expected tokens per forward, (1 - a^(k+1)) / (1 - a), over the
forward's cost relative to a plain step, 1 + k (draft_cost + verify_cost); when no k is expected
to beat plain decoding by MIN_GAIN the step decodes plainly, and the estimate drifts back to its
prior so the drafter is tried again later.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ConfigError
from .sampling import SamplingParams, logits_to_probs, penalized
from .weights import weight_bytes_per_step

MAX_K = 16  # the largest --speculate-k
ADAPTIVE_MAX_K = 10  # the largest k the adaptive choice takes
LOOKUP_NGRAMS = (3, 2)  # n-gram lengths prompt lookup matches, longest first
NEAR = 4  # how far from where a copy stopped agreeing a match counts as picking it up
MIN_GAIN = 1.05  # speculate only when the estimate promises 5% more tokens per unit of cost
DECAY = 0.85  # weight of past rounds in the acceptance estimate, per round
SKIP_DECAY = 0.93  # per skipped chance: the estimate drifts back to its prior
PRIOR_WEIGHT = 2.0  # the prior counts as this many draft tokens
FEED_AS_STEP = 8  # a drafter feeds up to this many tokens through its one-token step


# On a CPU an int8 or 4-bit weight costs what reading about 1.1 bytes does (measured here, 2 AVX2
# cores: SmolLM2's int4 and int8 copies step in 0.24-0.27 and 0.29 of its float32 step, its Q4_1
# file in 0.33, where their bytes are 0.16, 0.26 and 0.18 of float32's). By bytes alone an int4
# self-draft's k came out too long: 1.57x plain decoding, against 1.92x with the cost measured.
CPU_QUANTIZED_BYTES_PER_WEIGHT = 1.1
SELF_DRAFTS = ("int8", "int4")  # draft= values meaning a quantized copy of the model itself


def check_speculation(
    speculate: str | None,
    draft: object,
    k: int | None,
    *,
    compile: bool = False,
    split: bool = False,
    offload: bool = False,
    amx: bool = False,
) -> None:
    """Refuse load()'s speculation settings that cannot work, before any weight is read."""
    if speculate is not None and speculate != "lookup":
        raise ConfigError(
            f"speculate must be 'lookup' (prompt lookup), got {speculate!r}; a draft model is "
            "given with draft=PATH (CLI: --draft MODEL), a quantized copy with draft='int4'"
        )
    if speculate is not None and draft is not None:
        raise ConfigError("--speculate lookup and --draft are two ways of drafting: choose one")
    if (speculate or draft) and (compile or split):
        raise ConfigError(
            "speculative decoding (--speculate/--draft) cannot be combined with "
            f"{'--compile' if compile else '--tp/--pp'} yet: drop one of them"
        )
    if (speculate or draft) and amx:
        raise ConfigError(
            "speculative decoding (--speculate/--draft) keeps the plain output only with kernels "
            "whose rows do not depend on their batch, and amx=True's int8 products do: drop one"
        )
    if draft in SELF_DRAFTS and offload:
        raise ConfigError(
            f"--draft {draft} cannot be combined with --offload yet: the quantized copy would "
            "have to follow the offloaded blocks; use --speculate lookup or a --draft MODEL"
        )
    if k is None:
        return
    if speculate is None and draft is None:
        raise ConfigError(
            "--speculate-k sets how many drafted tokens each forward checks, but nothing drafts: "
            "add --speculate lookup or --draft MODEL|int4|int8"
        )
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
        raise ConfigError(
            f"--speculate-k must be an integer from 1 to {MAX_K}, got {k!r}: it is how many "
            "drafted tokens each forward checks (leave it out to adapt it to the acceptance rate)"
        )


@dataclass
class Draft:
    tokens: list[int]
    # (len(tokens), V): the draft's probabilities q at each token; None for point masses
    # (lookup) and for greedy rows, whose check compares argmaxes
    probs: torch.Tensor | None = None


@dataclass
class SpeculationStats:
    rounds: int = 0  # forwards that checked a draft
    proposed: int = 0  # draft tokens checked
    accepted: int = 0  # draft tokens kept
    emitted: int = 0  # tokens the rounds produced (kept ones plus the model's own)
    plain_steps: int = 0  # lone-row steps without a draft (none found, or not worth it)
    batched_steps: int = 0  # steps with several rows running, which decode plainly

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """New tokens per forward of the model, over the lone-row steps (1.0 without drafts)."""
        forwards = self.rounds + self.plain_steps
        return (self.emitted + self.plain_steps) / forwards if forwards else 0.0

    def as_dict(self) -> dict:
        return {
            "rounds": self.rounds,
            "proposed": self.proposed,
            "accepted": self.accepted,
            "plain_steps": self.plain_steps,
            "batched_steps": self.batched_steps,
            "acceptance_rate": self.acceptance_rate,
            "tokens_per_forward": self.tokens_per_forward,
        }


def best_k(alpha: float, cost: float, k_max: int) -> int:
    """The draft length maximising expected tokens per unit of cost, (1 - a^(k+1)) / (1 - a) /
    (1 + k * cost), or 0 when plain decoding (one token per unit) is expected to do as well
    within MIN_GAIN."""
    a = min(max(alpha, 0.0), 0.99)
    best, best_gain = 0, MIN_GAIN
    for k in range(1, k_max + 1):
        gain = (1 - a ** (k + 1)) / (1 - a) / (1 + k * cost)
        if gain > best_gain:
            best, best_gain = k, gain
    return best


class _Rate:
    """Decayed counts of kept and rejected draft tokens over a prior: the chance the next draft
    token is kept. Drafts cut short by a rejection tell one miss; a draft kept whole, none."""

    def __init__(self, prior: float):
        self.prior, self.hits, self.misses = prior, 0.0, 0.0

    @property
    def alpha(self) -> float:
        return (self.hits + PRIOR_WEIGHT * self.prior) / (self.hits + self.misses + PRIOR_WEIGHT)

    def update(self, kept: int, rejected: bool) -> None:
        self.hits = DECAY * self.hits + kept
        self.misses = DECAY * self.misses + rejected

    def skipped(self) -> None:
        self.hits *= SKIP_DECAY
        self.misses *= SKIP_DECAY


def choose(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator,
    proposed: int | None,
    q: torch.Tensor | None,
) -> int:
    """The token at one checked position, from the model's (penalised) logits (V,): `proposed`
    when kept, else a draw from the residual max(0, p - q); past the draft (proposed None) a draw
    from p. q: the draft's probabilities (V,), None for a point mass on `proposed`."""
    if params.is_greedy:
        return int(logits.argmax())
    p = logits_to_probs(logits[None], params)[0]
    if proposed is None:
        return int(torch.multinomial(p, 1, generator=generator))
    q_x = 1.0 if q is None else float(q[proposed])
    u = float(torch.rand((), generator=generator, device=p.device))
    if u * q_x < float(p[proposed]):  # u < p(x) / q(x)
        return proposed
    if q is None:
        residual = p.clone()
        residual[proposed] = 0.0
    else:
        residual = (p - q).clamp_(min=0.0)
    if not float(residual.sum()) > 0:  # p == q to rounding: never rejected in exact arithmetic
        residual = p
    return int(torch.multinomial(residual, 1, generator=generator))


class _NgramIndex:
    """For each n, the n-grams of a row's tokens -> where each occurrence ended (in order), for
    the n-grams ending before the last token (so the row's own suffix finds an earlier one)."""

    def __init__(self, ngrams: tuple[int, ...]):
        self.ngrams = ngrams
        self.sizes = tuple(sorted({*ngrams, 1}, reverse=True))  # 1-grams: only near a copy
        self.tables: dict[int, dict[tuple[int, ...], list[int]]] = {n: {} for n in self.sizes}
        self.upto = 0  # ends 1..upto are indexed

    def find(self, tokens: list[int], near: int | None = None) -> int | None:
        """Where the continuation of the row's suffix starts, or None. With `near` (where a copy
        stopped agreeing), first the longest suffix, down to the last token alone, with an
        occurrence ending within NEAR of near + 1: a model copying a text that inserts or
        swaps a word picks the copy up there. Otherwise the latest occurrence of the longest
        suffix of LOOKUP_NGRAMS' lengths."""
        for end in range(self.upto + 1, len(tokens)):
            for n in self.sizes:
                if end >= n:
                    self.tables[n].setdefault(tuple(tokens[end - n : end]), []).append(end)
        self.upto = max(self.upto, len(tokens) - 1)
        if near is not None:
            for n in self.sizes:
                if len(tokens) > n:
                    ends = self.tables[n].get(tuple(tokens[-n:]), ())
                    close = [e for e in ends if abs(e - near - 1) <= NEAR]
                    if close:
                        return min(close, key=lambda e: (abs(e - near - 1), -e))
        for n in self.ngrams:
            if len(tokens) > n:
                ends = self.tables[n].get(tuple(tokens[-n:]))
                if ends:
                    return ends[-1]
        return None


class LookupDrafter:
    """Prompt lookup: propose what followed an earlier occurrence of the row's last n-gram. A
    match close to the end continues periodically (a repeated phrase repeats on).

    Of several occurrences it takes the one nearest where the last draft stopped agreeing: a
    model copying a text that departs from it by a word ("glass, and" for "glass and") picks
    the copy up there, where the latest ", and" elsewhere in the text proposed the wrong words.
    Without an earlier draft, the latest occurrence."""

    free = True  # proposing costs no forward, so it is tried even when the estimate says skip

    def __init__(self, ngrams: tuple[int, ...] = LOOKUP_NGRAMS):
        self.ngrams = ngrams
        self._rows: dict[int, _LookupRow] = {}

    def propose(self, slot: int, state, k: int) -> Draft:
        row = self._rows.get(slot)
        if row is None or row.state is not state:  # a new request in this row
            row = self._rows[slot] = _LookupRow(state, _NgramIndex(self.ngrams))
        tokens = state.tokens
        start = row.index.find(tokens, row.near)
        if start is None:
            return Draft([])
        row.drafted = (start, len(tokens))
        period = len(tokens) - start
        return Draft([tokens[start + i % period] for i in range(k)])

    def sync(self, slot: int, state, agreed: int) -> None:
        row = self._rows.get(slot)
        if row is not None and row.state is state and row.drafted is not None:
            start, n = row.drafted
            row.near = start + max(agreed - n, 0)  # the text position of the first disagreement


@dataclass
class _LookupRow:
    """What prompt lookup keeps of a slot's request."""

    state: object
    index: _NgramIndex
    near: int | None = None  # where the copy stopped agreeing, in the row's tokens
    drafted: tuple[int, int] | None = None  # (start, n): draft token i was tokens[start + i]


class ModelDrafter:
    """Drafts with a model: its own one-row cache (a smaller model), or the target's cache rows
    (a quantized copy of the target, `shares_cache`). `decode` is that model's one-token step
    (tokens, input_pos, rows) -> logits, which takes several entries for one row at once."""

    free = False

    def __init__(self, model, decode, *, shares_cache: bool):
        self.model, self.decode, self.shares_cache = model, decode, shares_cache
        self.device = model.norm.weight.device
        # own cache: (the slot's state it holds, how many leading tokens of it are valid)
        self._held: tuple[object, int] | None = None

    def propose(self, slot: int, state, k: int) -> Draft:
        tokens, params = state.tokens, state.params
        n = len(tokens)
        if self.shares_cache:
            row, have = slot, n - 1  # the target's row holds every token but the last
        else:
            row = 0
            have = self._held[1] if self._held is not None and self._held[0] is state else 0
        logits = self._feed(row, tokens[have:], have)
        drafted: list[int] = []
        probs: list[torch.Tensor] = []
        for i in range(k):
            if i:
                logits = self._feed(row, drafted[-1:], n + i - 1)
            logits = penalized(logits, params, tokens + drafted, state.prompt_len)
            if params.is_greedy:
                drafted.append(int(logits.argmax()))
                continue
            q = logits_to_probs(logits[None], params)[0]
            drafted.append(int(torch.multinomial(q, 1, generator=state.generator)))
            probs.append(q)
        if not self.shares_cache:
            self._held = (state, n + k - 1)  # the last draft token was never fed
        return Draft(drafted, torch.stack(probs) if probs else None)

    def sync(self, slot: int, state, agreed: int) -> None:
        """The row's tokens now agree with what was drafted over on their first `agreed`."""
        if self._held is not None and self._held[0] is state:
            self._held = (state, min(self._held[1], agreed))

    def _feed(self, row: int, tokens: list[int], start: int) -> torch.Tensor:
        """Write `tokens` at positions start.. of cache row `row`; the last one's logits (V,)."""
        ids = torch.tensor(tokens, device=self.device)
        pos = torch.arange(start, start + len(tokens), device=self.device)
        if len(tokens) == 1 or (self.device.type == "cpu" and len(tokens) <= FEED_AS_STEP):
            rows = torch.full((len(tokens),), row, device=self.device)
            return self.decode(ids[:, None], pos[:, None], rows)[-1]
        rows = torch.tensor([row], device=self.device)
        chunk = 512  # as Engine.prefill: bounds attention memory
        for a in range(0, len(tokens), chunk):
            logits = self.model(ids[None, a : a + chunk], pos[None, a : a + chunk], rows)
        return logits[0]


class Speculator:
    """What the Engine asks on each lone-row step: a draft to check (`plan`), then what was kept
    (`record`). method: "lookup", "draft" (another model) or "self" (a quantized copy).
    draft_cost: one draft token's cost relative to a plain step of the model; verify_cost: what
    each checked position adds to the model's forward, relative to a plain step."""

    def __init__(
        self,
        drafter: LookupDrafter | ModelDrafter,
        *,
        method: str,
        k: int | None = None,
        draft_cost: float = 0.0,
        verify_cost: float = 0.1,
        prior: float = 0.6,
    ):
        self.drafter, self.method, self.k = drafter, method, k
        self.cost = draft_cost + verify_cost
        self.prior = prior
        self.stats = SpeculationStats()
        self._rates: dict[int, tuple[object, _Rate]] = {}

    def describe(self) -> str:
        k = f"k={self.k}" if self.k else f"adaptive k <= {ADAPTIVE_MAX_K}"
        return f"{self.method} ({k})"

    def rate(self, slot: int, state) -> _Rate:
        held = self._rates.get(slot)
        if held is None or held[0] is not state:
            held = self._rates[slot] = (state, _Rate(self.prior))
        return held[1]

    def plan(self, slot: int, state, room: int) -> Draft | None:
        """A draft of at most `room` tokens for the row in `slot`, or None: decode plainly."""
        rate = self.rate(slot, state)
        k = min(self.k or best_k(rate.alpha, self.cost, ADAPTIVE_MAX_K), room)
        draft = None
        if room >= 1 and (k >= 1 or self.drafter.free):
            draft = self.drafter.propose(slot, state, max(k, 1))
        if draft is not None and draft.tokens and k == 0:
            rate.skipped()  # a chance not taken: the estimate relaxes toward its prior
            draft = None
        if draft is None or not draft.tokens:
            self.stats.plain_steps += 1
            return None
        return draft

    def record(self, slot: int, state, draft: Draft, kept: int, emitted: int, agreed: int):
        """A round's outcome: `kept` draft tokens kept, `emitted` tokens out; the row's tokens
        agree with the draft's on their first `agreed`."""
        rejected = kept < len(draft.tokens) and not state.finish_reason
        self.rate(slot, state).update(kept, rejected)
        self.drafter.sync(slot, state, agreed)
        s = self.stats
        s.rounds, s.proposed, s.accepted = (
            s.rounds + 1,
            s.proposed + len(draft.tokens),
            s.accepted + kept,
        )
        s.emitted += emitted


def verify_cost(model: torch.nn.Module) -> float:
    """What one more checked position adds to a forward, relative to a plain step (measured
    here, 2 AVX2 cores, benchmarks/speculative.py): little for float32 weights, whose reads
    dominate; more for 4- and 8-bit ones, whose integer products cost as much as their reads;
    next to nothing on a GPU."""
    if model.norm.weight.device.type != "cpu":
        return 0.02
    return 0.25 if any(map(_integer_kernel, model.modules())) else 0.1


def _integer_kernel(m: torch.nn.Module) -> bool:
    """An int8 (scales), int4 (qs) or GGUF-block (qtype) layer."""
    return any(hasattr(m, a) for a in ("qs", "scales", "qtype"))


def relative_cost(draft: torch.nn.Module, target: torch.nn.Module) -> float:
    """A draft token's cost relative to a plain step of the target: the ratio of their steps'
    costs (step_cost), with a floor for the per-step overhead of a tiny draft."""
    return max(step_cost(draft) / max(step_cost(target), 1), 0.03)


def step_cost(model: torch.nn.Module) -> float:
    """A decode step's cost, in bytes read: its weights' bytes, except that on a CPU a weight of
    an integer kernel (int8, int4, GGUF blocks) counts at least CPU_QUANTIZED_BYTES_PER_WEIGHT:
    those products are bound by their arithmetic, not their reads."""
    total = float(weight_bytes_per_step(model))
    if model.norm.weight.device.type != "cpu":
        return total
    for m in model.modules():
        if not _integer_kernel(m) or not hasattr(m, "in_features"):
            continue  # not an integer linear (a packed embedding is looked up, not multiplied)
        stored = sum(t.numel() * t.element_size() for t in m.buffers(recurse=False))
        total += max(0.0, CPU_QUANTIZED_BYTES_PER_WEIGHT * m.in_features * m.out_features - stored)
    return total
