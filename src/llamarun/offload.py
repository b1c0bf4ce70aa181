"""Place a loaded model on its devices block by block: quantize each block on the device it will
run on, and keep the last `n_offload` blocks on a second device (the CPU) when the GPU is too small.

The model's math is untouched: an offloaded block is wrapped in `OffloadedBlock`, which moves the
block's inputs to its device and its output to the next block's device, so activations cross only
at the boundary. Moving one block at a time also bounds the peak while quantizing: the device never
holds more than the quantized blocks so far plus one block in the run dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .model import Transformer, TransformerBlock


class OffloadedBlock(nn.Module):
    """A transformer block that runs on `device`; its output goes to `out_device`."""

    def __init__(self, block: TransformerBlock, device: torch.device, out_device: torch.device):
        super().__init__()
        self.block = block
        self.device = torch.device(device)
        self.out_device = torch.device(out_device)

    # The block's parts, so code that walks model.layers (setup_caches, fuse_) sees the same names.
    @property
    def attention(self) -> nn.Module:
        return self.block.attention

    @property
    def feed_forward(self) -> nn.Module:
        return self.block.feed_forward

    @property
    def attention_norm(self) -> nn.Module:
        return self.block.attention_norm

    @property
    def ffn_norm(self) -> nn.Module:
        return self.block.ffn_norm

    def forward(self, x, cos, sin, mask, input_pos, rows):
        moved = [
            t.to(self.device) if t is not None else None
            for t in (x, cos, sin, mask, input_pos, rows)
        ]
        return self.block(*moved).to(self.out_device)

    def extra_repr(self) -> str:
        return f"device={self.device}, out_device={self.out_device}"


def place_(
    model: Transformer,
    device: torch.device,
    dtype: torch.dtype,
    *,
    n_offload: int = 0,
    offload_device: torch.device | str = "cpu",
    quantize: Callable[[nn.Module], object] | None = None,
) -> Transformer:
    """Move `model` (built on the CPU) to `device` in `dtype`, block by block, in place. The last
    `n_offload` blocks go to `offload_device` instead, wrapped in OffloadedBlock. `quantize(module)`
    swaps a module's linears and runs right after the module reaches its device. Caches set up
    before this call move with their blocks."""
    device, offload_device = torch.device(device), torch.device(offload_device)
    n_layers = len(model.layers)
    first_offloaded = n_layers - n_offload
    devices = [device if i < first_offloaded else offload_device for i in range(n_layers)]
    for i, block in enumerate(list(model.layers)):
        _move(block, devices[i], dtype)
        if quantize is not None:
            quantize(block)
        if i >= first_offloaded:
            out_device = devices[i + 1] if i + 1 < n_layers else device
            model.layers[i] = OffloadedBlock(block, devices[i], out_device)
    for child in (model.tok_embeddings, model.norm, model.output):
        _move(child, device, dtype)
    for name, buffer in list(model.named_buffers(recurse=False)):  # RoPE tables, slot ids
        setattr(model, name, buffer.to(device))
    if quantize is not None:
        quantize(model)  # what is left outside the blocks (an untied output)
    return model


def _move(module: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Float parameters to `dtype` and everything to `device`. Buffers keep their dtype: the KV
    cache is made in the run dtype, and quantized layers' scales have the dtype their kernels need."""
    for p in module.parameters():
        p.data = p.data.to(device=device, dtype=dtype if p.is_floating_point() else p.dtype)
    module.to(device)


def block_devices(model: Transformer) -> list[torch.device]:
    """The device each block runs on."""
    return [
        layer.device if isinstance(layer, OffloadedBlock) else layer.attention_norm.weight.device
        for layer in model.layers
    ]
