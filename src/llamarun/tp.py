"""Tensor parallelism as a declarative plan over Meta's module names (HF's tp_plan, gpt-fast's
tp.py, Megatron's layers): a "colwise" linear keeps a contiguous share of its output rows and
needs no communication; a "rowwise" one keeps the matching share of its input columns and
all-reduces its output (one all-reduce per attention, one per feed-forward); "vocab" splits the
embedding and the classifier by vocabulary rows.

Three steps around loading, each a function build.py calls: `shard_weights` takes each rank's
slice of the checkpoint's weights (memory-mapped views, Meta shards, packed blocks cut on block
boundaries, so no rank reads the whole model); `shrink_` sizes the model's modules, still on the
meta device, to those slices (and the attention's head counts, in one place); `parallelize_`
wraps the modules that communicate once they hold their weights, so the reductions show in
print(model).
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .distributed import World, guarded
from .loaders.files import drop_file_pages, file_mappings
from .model import Transformer
from .packed import PackedEmbedding
from .quantize import Int8Linear
from .split import Split, shard_bounds, shard_size
from .weights import LazyWeight, PackedWeight

TP_PLAN = {
    "attention.wq": "colwise",
    "attention.wk": "colwise",
    "attention.wv": "colwise",
    "attention.wo": "rowwise",
    "feed_forward.w1": "colwise",
    "feed_forward.w3": "colwise",
    "feed_forward.w2": "rowwise",
    "tok_embeddings": "vocab",
    "output": "vocab",
}
_BLOCK_PREFIX = re.compile(r"^layers\.\d+\.")
Weight = torch.Tensor | PackedWeight | LazyWeight


def plan_style(module_name: str) -> str | None:
    """The plan's style for a module ("layers.3.attention.wo" -> "rowwise"); None: replicated."""
    return TP_PLAN.get(_BLOCK_PREFIX.sub("", module_name))


def weight_slice(name: str, shape: tuple[int, ...], split: Split, tp_rank: int):
    """(dim, start, length) of `tp_rank`'s share of weight `name`, or None when replicated."""
    style = plan_style(name.removesuffix(".weight"))
    if style is None:
        return None
    dim = 1 if style == "rowwise" else 0
    return (dim, *shard_bounds(shape[dim], split.tp, tp_rank))


def shard_weights(weights: dict[str, Weight], split: Split, tp_rank: int) -> dict[str, Weight]:
    """Each weight's share for `tp_rank`. Float slices are copied out of the file's mapping, and
    the pages the copy read are let go at once: a view would keep the whole mapping resident,
    and a column slice reads every page of its matrix (that doubled a rank's peak). Packed
    slices stay views, which their layers copy apart anyway."""
    mappings = file_mappings()
    out: dict[str, Weight] = {}
    for name, w in weights.items():
        cut = weight_slice(name, tuple(w.shape), split, tp_rank) if split.tp > 1 else None
        share = w.narrow(*cut) if cut is not None else w
        if isinstance(share, PackedWeight):
            out[name] = share
            continue
        if not isinstance(share, torch.Tensor):  # a LazyWeight this rank holds whole
            share = share.narrow(0, 0, share.shape[0])
        out[name] = share.clone()
        for source in w.sources if hasattr(w, "sources") else [w]:
            drop_file_pages(source, mappings)
    return out


def shrink_(model: Transformer, split: Split, tp_rank: int) -> Transformer:
    """Replace the planned modules of a meta-device model by ones of this rank's shapes, and
    set each attention's head counts to this rank's share; in place."""
    if split.tp == 1:
        return model
    for name, module in list(model.named_modules()):
        style = plan_style(name)
        if style is None:
            continue
        if isinstance(module, nn.Embedding):
            n = shard_bounds(module.num_embeddings, split.tp, tp_rank)[1]
            new = nn.Embedding(n, module.embedding_dim, device="meta")
        else:
            out_features, in_features = module.out_features, module.in_features
            if style == "rowwise":
                in_features //= split.tp
            else:
                out_features = shard_bounds(out_features, split.tp, tp_rank)[1]
            new = nn.Linear(in_features, out_features, bias=False, device="meta")
        _replace(model, name, new)
    for layer in model.layers:
        layer.attention.n_heads //= split.tp
        layer.attention.n_kv_heads //= split.tp
    return model


def quantize_rowwise_int8_(model: Transformer, world: World) -> Transformer:
    """int8 for the rowwise linears with the whole rows' scales (one all-reduce of the row
    maxima per layer), so each rank's share holds the integers one process's int8 layer holds;
    quantize_ then takes the other linears, whose rows are whole on every rank. In place."""
    for name, module in list(model.named_modules()):
        if plan_style(name) == "rowwise" and type(module) is nn.Linear:
            absmax = module.weight.detach().float().abs().amax(dim=1, keepdim=True)  # (out, 1)
            op = dist.ReduceOp.MAX
            guarded("agreeing on int8 scales", dist.all_reduce, absmax, op, group=world.tp_group)
            _replace(model, name, Int8Linear.from_float(module.weight, absmax))
    return model


def parallelize_(model: Transformer, world: World) -> Transformer:
    """Wrap the modules that communicate, after they hold their weights (and after quantize_,
    which swaps the plain linears inside): rowwise linears, the embedding, the classifier."""
    split = world.split
    if split.tp == 1:
        return model
    group = world.tp_group
    first = world.split.rank_at(world.stage, 0)  # where a stage's logits are gathered
    vocab = model.args.vocab_size
    for name, module in list(model.named_modules()):
        style = plan_style(name)
        if style == "rowwise":
            _replace(model, name, RowParallelLinear(module, group))
        elif style == "vocab" and isinstance(module, nn.Embedding | PackedEmbedding):
            start = shard_bounds(vocab, split.tp, world.tp_rank)[0]
            kind = VocabParallelEmbedding if isinstance(module, nn.Embedding) else PackedVocabShare
            _replace(model, name, kind.wrap(module, start, group))
        elif style == "vocab":
            _replace(model, name, VocabParallelOutput(module, vocab, split.tp, first, group))
    return model


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


class RowParallelLinear(nn.Module):
    """A linear holding a share of the input columns: its outputs are partial sums, added up
    across the tensor-parallel group."""

    def __init__(self, linear: nn.Module, group: dist.ProcessGroup | None):
        super().__init__()
        self.linear, self.group = linear, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        guarded("adding up a row-parallel layer", dist.all_reduce, y, group=self.group)
        return y


class VocabParallelEmbedding(nn.Embedding):
    """The rows start..start+n of the embedding: a token outside them looks up zeros, and the
    all-reduce adds the one rank's row that holds it (exact: the others add zeros)."""

    start: int
    group: dist.ProcessGroup | None

    @classmethod
    def wrap(cls, embedding: nn.Embedding, start: int, group) -> VocabParallelEmbedding:
        new = cls(embedding.num_embeddings, embedding.embedding_dim, device="meta")
        new.weight = embedding.weight  # the same Parameter: a tied classifier stays tied
        new.start, new.group = start, group
        return new

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return _vocab_share(lambda t: F.embedding(t, self.weight), tokens, self)


class PackedVocabShare(PackedEmbedding):
    """VocabParallelEmbedding over rows kept in GGUF blocks: the same bytes, looked up as
    PackedEmbedding does."""

    start: int
    group: dist.ProcessGroup | None

    @classmethod
    def wrap(cls, embedding: PackedEmbedding, start: int, group) -> PackedVocabShare:
        e = embedding
        new = cls(e.qtype, e.num_embeddings, e.embedding_dim, e.data, e.dtype)
        new.start, new.group = start, group
        return new

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return _vocab_share(super().forward, tokens, self)


def _vocab_share(lookup, tokens: torch.Tensor, share) -> torch.Tensor:
    """A vocabulary share's embedding: rows share.start.. looked up, zeros for tokens outside
    them, added up across the group (exact: one rank holds each token's row)."""
    local = tokens - share.start
    inside = (local >= 0) & (local < share.num_embeddings)
    h = lookup(local.clamp(0, share.num_embeddings - 1))  # (B, T, C)
    h = h * inside.unsqueeze(-1).to(h.dtype)
    guarded("adding up the embedding", dist.all_reduce, h, group=share.group)
    return h


class VocabParallelOutput(nn.Module):
    """The classifier's share of the vocabulary: the stage's first rank gathers the pieces into
    whole logits (it samples, or sends them to rank 0); the others return their own piece,
    which nobody reads. Pieces are padded to equal sizes when the vocabulary does not divide."""

    def __init__(self, linear: nn.Module, vocab_size: int, tp: int, dst: int, group):
        super().__init__()
        self.linear, self.group = linear, group
        self.vocab_size, self.per_rank, self.tp, self.dst = (
            vocab_size,
            shard_size(vocab_size, tp),
            tp,
            dst,
        )

    @property
    def weight(self) -> torch.Tensor:  # the rank's share, where code reads model.output.weight
        return self.linear.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.linear(h)  # (..., V / tp)
        if logits.shape[-1] < self.per_rank:
            logits = F.pad(logits, (0, self.per_rank - logits.shape[-1]))
        logits = logits.contiguous()
        gathering = dist.get_rank() == self.dst
        pieces = [torch.empty_like(logits) for _ in range(self.tp)] if gathering else None
        guarded("gathering the logits", dist.gather, logits, pieces, dst=self.dst, group=self.group)
        return torch.cat(pieces, dim=-1)[..., : self.vocab_size] if gathering else logits

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, per_rank={self.per_rank}"
