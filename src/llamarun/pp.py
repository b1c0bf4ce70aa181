"""Pipeline parallelism: each stage holds a contiguous block of layers (llama.cpp's layer split
over devices, and over machines with its RPC backend) and hands its hidden states (B, T, C) to
the next stage point-to-point; the last stage sends the logits to rank 0, which samples.

Per forward only the hidden states cross each stage boundary, against tensor parallelism's
all-reduce in every layer, which is what suits machines joined by an ordinary network. One batch
is in flight at a time, so the stages take turns: the split divides memory, not time.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .config import ModelArgs
from .distributed import World, guarded
from .model import Transformer
from .split import Split, stage_layers


def stage_weights(weights: dict, args: ModelArgs, split: Split, stage: int) -> dict:
    """The weights stage `stage` holds: its layers, the embedding on the first stage, the
    classifier on the last (a tied one as the embedding's matrix), the final norm on every
    stage (see keep_stage_). Nothing else is read."""
    if split.pp == 1:
        return dict(weights)
    layers = stage_layers(args.n_layers, split.pp, stage)
    first, last = stage == 0, stage == split.pp - 1
    out = {}
    for name, w in weights.items():
        if name.startswith("layers."):
            keep = int(name.split(".")[1]) in layers
        else:
            keep = {"tok_embeddings.weight": first, "output.weight": last}.get(name, True)
        if keep:
            out[name] = w
    if args.tie_embeddings and last and not first and "output.weight" not in weights:
        out["output.weight"] = weights["tok_embeddings.weight"]
    return out


def keep_stage_(model: Transformer, split: Split, stage: int) -> Transformer:
    """Drop from a meta-device model what stage `stage` does not run, in place. Layers keep their
    names (layers.12.* on the second of two 24-layer stages), so the checkpoint's names load.
    The final norm (dim numbers) stays everywhere: the engine finds the model's device and
    dtype from it."""
    if split.pp == 1:
        return model
    kept = nn.ModuleList()
    for i in stage_layers(model.args.n_layers, split.pp, stage):
        kept.add_module(str(i), model.layers[i])
    model.layers = kept
    if stage != 0:
        del model.tok_embeddings
    if stage != split.pp - 1:
        del model.output
    return model


class Stage:
    """This rank's share of a forward, called as the model is. Returns the logits on rank 0 (and
    on the last stage, which computes them); other ranks return None."""

    def __init__(self, model: Transformer, world: World):
        self.model, self.world = model, world
        split = world.split
        self.first, self.last = world.stage == 0, world.stage == split.pp - 1
        self.logits_from = split.rank_at(split.pp - 1, 0)  # holds whole logits (tp.py gathers)

    def __call__(
        self,
        tokens: torch.Tensor,
        input_pos: torch.Tensor,
        rows: torch.Tensor | None = None,
        *,
        all_logits: bool = False,
    ) -> torch.Tensor | None:
        model, world = self.model, self.world
        B, T = tokens.shape
        if self.first:
            h = model.tok_embeddings(tokens)  # (B, T, C)
        else:
            h = torch.empty(
                B, T, model.args.dim, dtype=model.norm.weight.dtype, device=world.device
            )
            src = world.stage_rank(world.stage - 1)
            guarded("receiving hidden states", dist.recv, h, src)
        h = model.forward_layers(h, input_pos, rows)
        if not self.last:
            guarded(
                "sending hidden states",
                dist.send,
                h.contiguous(),
                world.stage_rank(world.stage + 1),
            )
            logits = None
        else:
            logits = model.forward_head(h, all_logits=all_logits)
        if world.rank == self.logits_from != 0:
            guarded("sending the logits to rank 0", dist.send, logits, 0)
        elif world.rank == 0 and not self.last:
            shape = (B, T, model.args.vocab_size) if all_logits else (B, model.args.vocab_size)
            logits = torch.empty(shape, dtype=torch.float32, device=world.device)
            guarded("receiving the logits", dist.recv, logits, self.logits_from)
        return logits
