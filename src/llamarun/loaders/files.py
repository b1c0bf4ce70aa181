"""Readers shared by the Meta and Hugging Face loaders: JSON configs and torch.save'd state
dicts, each failure turned into one CheckpointError naming the file and the fix; and
`drop_file_pages`, which lets a memory-mapped tensor's pages go once they have been copied."""

from __future__ import annotations

import ctypes
import functools
import json
import mmap
import pickle
import sys
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


def file_mappings() -> list[tuple[int, int]]:
    """(start, end) addresses of this process's memory-mapped files (Linux /proc/self/maps)."""
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 6 and fields[4] != "0" and not fields[5].startswith("["):
                    start, end = fields[0].split("-")
                    ranges.append((int(start, 16), int(end, 16)))
    except OSError:
        return []
    return ranges


def drop_file_pages(t: torch.Tensor, mappings: list[tuple[int, int]] | None = None) -> None:
    """Drop the pages under tensor `t` from this process's resident memory when they belong to a
    memory-mapped file (Linux madvise DONTNEED): a later read faults them in from the file again.
    Used after copying out of a mapping, which otherwise keeps every page the copy touched
    resident (merging 2 Meta shards would peak at 1.5x the model; a rank's column slices of a
    matrix touch all of its pages). Anonymous memory is left alone: DONTNEED would zero it.
    `mappings`: file_mappings(), when the caller drops many tensors."""
    libc = _libc()
    if libc is None or t.device.type != "cpu" or t.numel() == 0:
        return
    first = t.data_ptr()
    end = first + (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))) * t.element_size()
    if not any(lo <= first and end <= hi for lo, hi in mappings or file_mappings()):
        return
    page = mmap.PAGESIZE
    start = -(-first // page) * page  # whole pages only: a neighbour may share the edge pages
    stop = end // page * page
    if stop > start:
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(stop - start), 4)  # MADV_DONTNEED


@functools.cache
def _libc():
    if sys.platform != "linux":
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
