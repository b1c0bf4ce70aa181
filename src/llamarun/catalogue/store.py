"""The local cache: `$LLAMARUN_HOME/models/NAME/` (default `~/.cache/llamarun`), what of the
catalogue is in it, and removing a model from it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import LlamarunError
from .entries import CATALOGUE, entry


def home() -> Path:
    """The cache root: $LLAMARUN_HOME, else ~/.cache/llamarun."""
    return Path(os.environ.get("LLAMARUN_HOME") or Path.home() / ".cache" / "llamarun").expanduser()


def model_dir(name: str) -> Path:
    return home() / "models" / name


def cached_path(name: str) -> Path | None:
    """The model file if every file of `name` is in the cache, else None."""
    folder = model_dir(name)
    files = entry(name).files
    return (
        folder / files[0].filename if all((folder / f.filename).is_file() for f in files) else None
    )


def remove(name: str) -> Path:
    """Delete the cached files of `name`; returns the folder removed."""
    entry(name)
    folder = model_dir(name)
    if not folder.exists():
        raise LlamarunError(
            f"{name} is not in the cache ({folder} does not exist); `llamarun list` shows what is cached"
        )
    shutil.rmtree(folder)
    return folder


def cached() -> list[tuple[str, Path, int]]:
    """(name, model file, bytes of all its files) for each fully cached catalogue model."""
    out = []
    for name, e in CATALOGUE.items():
        path = cached_path(name)
        if path is not None:
            out.append(
                (name, path, sum((path.parent / f.filename).stat().st_size for f in e.files))
            )
    return out
