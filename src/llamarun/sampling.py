"""Sampling: SamplingParams and small pure functions from logits to next token ids.

Order of filters (as litgpt documents it): penalties -> top_k -> temperature -> min_p -> top_p.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from . import guided
from .errors import RequestError


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token.

    temperature: >= 0; 0 is greedy. top_k: keep the k most likely (None or 0 disables).
    top_p: in (0, 1]; 1 disables. min_p: in [0, 1]; drop tokens below min_p * p(max).
    repetition_penalty: > 0; 1 disables (divides positive logits of seen tokens, CTRL-style).
    presence_penalty / frequency_penalty: in [-2, 2], OpenAI-style, on generated tokens.
    stop: strings that end generation (not included in the output). seed: makes sampling reproducible.
    Constraints (at most one): json_schema (a JSON schema as a dict or JSON text; True or {}: any
    JSON object), regex (the whole output matches it), grammar (GBNF or Lark), choice (the output
    is one of these strings). A constrained row ends ("stop") when its grammar is complete.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None
    json_schema: bool | dict | str | None = None
    regex: str | None = None
    grammar: str | None = None
    choice: Sequence[str] | None = None
    guide: guided.Guide | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise RequestError(
                    f"{name} must be {rule}, got {getattr(self, name)!r}", param=name
                )

        check(_finite(self.temperature) and self.temperature >= 0, "temperature", ">= 0")
        check(
            self.top_k is None or (isinstance(self.top_k, int) and self.top_k >= 0),
            "top_k",
            "a non-negative integer",
        )
        check(_finite(self.top_p) and 0 < self.top_p <= 1, "top_p", "in (0, 1]")
        check(_finite(self.min_p) and 0 <= self.min_p <= 1, "min_p", "in [0, 1]")
        check(
            _finite(self.repetition_penalty) and self.repetition_penalty > 0,
            "repetition_penalty",
            "> 0",
        )
        check(
            _finite(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
            "presence_penalty",
            "in [-2, 2]",
        )
        check(
            _finite(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
            "frequency_penalty",
            "in [-2, 2]",
        )
        check(
            isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 0,
            "max_new_tokens",
            "a non-negative integer",
        )
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        check(all(isinstance(s, str) and s for s in self.stop), "stop", "non-empty strings")
        check(self.seed is None or isinstance(self.seed, int), "seed", "an integer")
        if self.choice is not None and not isinstance(self.choice, str):
            object.__setattr__(self, "choice", tuple(self.choice))
        guide = guided.make_guide(self.json_schema, self.regex, self.grammar, self.choice)
        if guide is not None:
            guided.check(guide)  # a bad schema or grammar fails here, before any token
        object.__setattr__(self, "guide", guide)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1
            or self.presence_penalty != 0
            or self.frequency_penalty != 0
        )


def apply_penalties(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: torch.Tensor | None,
    generated: torch.Tensor | None,
) -> torch.Tensor:
    """seen: ids in prompt+output (repetition penalty); generated: output ids (OpenAI penalties)."""
    logits = logits.clone()
    if params.repetition_penalty != 1 and seen is not None and seen.numel():
        ids = seen.unique()
        picked = logits[..., ids]
        logits[..., ids] = torch.where(
            picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty
        )
    if (
        (params.presence_penalty or params.frequency_penalty)
        and generated is not None
        and generated.numel()
    ):
        counts = torch.bincount(generated, minlength=logits.shape[-1]).to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(
            logits.dtype
        )
    return logits


def penalized(
    logits: torch.Tensor, params: SamplingParams, tokens: list[int], prompt_len: int
) -> torch.Tensor:
    """logits with params' penalties over `tokens` (prompt and output so far), as a decode step
    applies them (list form, for the engine's per-row picks and the drafts)."""
    if not params.has_penalties:
        return logits
    seen = torch.tensor(tokens, device=logits.device)
    return apply_penalties(logits, params, seen, seen[prompt_len:])


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(..., V) float logits -> probabilities after top_k, temperature, min_p and top_p."""
    logits = logits.float()
    if params.top_k:
        k = min(params.top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    probs = torch.softmax(logits / max(params.temperature, 1e-5), dim=-1)
    if params.min_p > 0:
        floor = params.min_p * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < floor, 0.0)
    if params.top_p < 1:
        probs = top_p_filter(probs, params.top_p)
    return probs / probs.sum(dim=-1, keepdim=True)


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (Meta's sample_top_p rule)."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) > top_p
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). Greedy when temperature == 0 (or top_k == 1)."""
    if params.is_greedy:
        return logits.argmax(dim=-1)
    probs = logits_to_probs(logits, params)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample_top_p_meta(
    probs: torch.Tensor, top_p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Meta's reference `sample_top_p`, op for op, so seeded runs draw the same tokens as `llama`."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > top_p
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, next_token)
