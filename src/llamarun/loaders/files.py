"""Readers shared by the Meta and Hugging Face loaders: JSON configs and torch.save'd state
dicts, each failure turned into one CheckpointError naming the file and the fix."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from ..errors import CheckpointError


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{path} is not valid JSON ({e}); restore it from the original checkpoint"
        ) from e


def read_state_dict(file: Path, kind: str) -> dict[str, torch.Tensor]:
    """A torch.save'd state dict: memory-mapped when it is a zip file (torch >= 1.6), else read
    whole (the legacy pickle format cannot be mapped). Only tensors are unpickled."""
    try:
        with open(file, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CheckpointError(
            f"{file} could not be opened ({e}); check that it exists and is readable"
        ) from e
    if head != b"PK\x03\x04" and head[:1] != b"\x80":
        raise CheckpointError(
            f"{file} is not a PyTorch checkpoint (it starts with neither a zip nor a pickle header); the file is corrupt, download it again"
        )
    try:
        state = torch.load(file, map_location="cpu", mmap=head == b"PK\x03\x04", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise CheckpointError(
            f"{file} could not be read as a PyTorch checkpoint ({_first_sentence(e)}); the file is truncated or corrupt, download it again"
        ) from e
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise CheckpointError(
            f"{file} does not hold a dict of tensors (a state_dict); is it {kind}?"
        )
    return state


def _first_sentence(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text.split(". ")[0].rstrip(".")
