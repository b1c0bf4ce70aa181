"""The drafts of speculative decoding, built beside a prepared model (build.prepare calls this):
prompt lookup (no model), a weight-only quantized copy of the model sharing its caches
(self-speculation), or another checkpoint with the same vocabulary and a one-row cache.

Split from build.py for size; it builds only through build.py's own steps, which build.py hands
in (`load`, `prepare_`: passed, not imported, so the two files do not import each other), and
quantize.py's `quantized_copy`, so build.py stays the one place that readies a model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from .errors import ConfigError
from .loaders import read_header
from .model import Transformer
from .quantize import quantized_copy
from .speculate import (
    SELF_DRAFTS,
    LookupDrafter,
    ModelDrafter,
    Speculator,
    relative_cost,
    verify_cost,
)
from .weights import weight_bytes_per_step

log = logging.getLogger(__name__)


def draft_speculator(
    model: Transformer,
    *,
    speculate: str | None,
    draft: str | Path | None,
    k: int | None,
    load: Callable,
    prepare_: Callable,
) -> Speculator | None:
    """The Speculator for a prepared model, or None when neither speculate nor draft is set.
    load, prepare_: build.py's, which load a draft checkpoint and ready a quantized copy."""
    if speculate is None and draft is None:
        return None
    cost = verify_cost(model)
    if speculate == "lookup":
        return Speculator(LookupDrafter(), method="lookup", k=k, verify_cost=cost, prior=0.5)
    if draft in SELF_DRAFTS:
        copy = quantized_copy(model, draft)
        if weight_bytes_per_step(copy) > 0.9 * weight_bytes_per_step(model):
            raise ConfigError(
                f"--draft {draft} drafts with a {draft} copy of the model's float weights, but "
                "this model's weights are quantized already, so the copy would be no faster: "
                "use --speculate lookup or a smaller --draft MODEL"
            )
        drafter = ModelDrafter(copy, prepare_(copy), shares_cache=True)
        method = f"self-draft {draft}"
    else:
        drafter = ModelDrafter(*_draft_model(model, draft, load), shares_cache=False)
        method = f"draft {Path(draft).name}"
    return Speculator(
        drafter,
        method=method,
        k=k,
        draft_cost=relative_cost(drafter.model, model),
        verify_cost=cost,
        prior=0.7,
    )


def _draft_model(model: Transformer, path: str | Path, load: Callable):
    """Another checkpoint as a draft for `model`: same vocabulary (checked from its header,
    before its weights are read), on the model's device and dtype, with a one-row cache.
    Returns (its model, its one-token decode step)."""
    header = read_header(path)
    ours, theirs = model.args, header.args
    if theirs.vocab_size != ours.vocab_size:
        raise ConfigError(
            f"the draft model {path} has a vocabulary of {theirs.vocab_size} tokens but the "
            f"model's has {ours.vocab_size}: a draft must use the same tokenizer (a smaller "
            "model of the same family), or use --speculate lookup or --draft int4"
        )
    if theirs.n_params() > ours.n_params():
        log.warning(
            "llamarun: the draft model %s (%s parameters) is larger than the model (%s): "
            "drafting will cost more than it saves; pick a smaller draft",
            path,
            f"{theirs.n_params():,}",
            f"{ours.n_params():,}",
        )
    draft_llm = load(
        path,
        device=model.norm.weight.device,
        dtype=model.norm.weight.dtype,
        max_seq_len=model.max_seq_len,
        max_batch_size=1,
    )
    return draft_llm.model, draft_llm.engine.decode
