"""Model resolution: local folders, and Hub repo ids without touching the network."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import huggingface_hub  # a dependency of opencamp (pyproject.toml), never optional here
import pytest

import opencamp.hub as hub
from opencamp.hub import ModelNotFoundError, looks_like_repo_id, resolve_model

REPO_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_local_folder(smollm2_tokenizer_dir: Path) -> None:
    assert resolve_model(smollm2_tokenizer_dir) == smollm2_tokenizer_dir.resolve()
    assert resolve_model(str(smollm2_tokenizer_dir)) == smollm2_tokenizer_dir.resolve()


def test_relative_local_folder_wins_over_repo_id(tmp_path: Path, monkeypatch) -> None:
    # A folder named like a repo id is used as is, never downloaded.
    folder = tmp_path / "HuggingFaceTB" / "SmolLM2-135M-Instruct"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub, "_download", lambda *args: pytest.fail("must not download"))
    assert resolve_model(REPO_ID) == folder.resolve()


def test_local_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="config.json") as caught:
        resolve_model(tmp_path)
    assert "model.safetensors" in str(caught.value) and "tokenizer.json" in str(caught.value)


def test_file_instead_of_folder(tmp_path: Path) -> None:
    file = tmp_path / "model.gguf"
    file.write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        resolve_model(file)


@pytest.mark.parametrize("missing", ["/no/such/model/folder", "./relative/missing", "just-a-name"])
def test_nonexistent_path(missing: str) -> None:
    with pytest.raises(ModelNotFoundError, match="no such folder"):
        resolve_model(missing)


def test_nonexistent_path_object_is_never_a_repo_id(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match="no such folder"):
        resolve_model(Path("org/name"))


@pytest.mark.parametrize("name, expected", [
    ("HuggingFaceTB/SmolLM2-135M-Instruct", True), ("Qwen/Qwen2.5-0.5B-Instruct", True),
    ("meta-llama/Llama-3.2-1B", True), ("a/b", True), ("org_1/model_v2.0", True),
    ("gpt2", False), ("/abs/path", False), ("org/name/extra", False), ("org\\name", False),
    ("../org", False), ("org/..", False), ("org/-name", False), ("org/name.", False),
    ("org/na--me", False), ("~/models", False), ("org/na me", False), ("", False),
])
def test_repo_id_shape(name: str, expected: bool) -> None:
    assert looks_like_repo_id(name) is expected


def test_offline_without_cache_fails_without_touching_the_network(tmp_path: Path) -> None:
    # In a fresh interpreter: huggingface_hub reads HF_HOME / HF_HUB_OFFLINE when imported, so
    # setting them in this process would not reach an already imported huggingface_hub. Every
    # name lookup and connection there is refused and recorded: offline must mean no attempt.
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
    env.pop("HF_HUB_CACHE", None)
    # hub.py is loaded by path so the subprocess does not need the compiled package.
    script = textwrap.dedent(f"""
        import importlib.util, socket, sys
        attempts = []
        def refuse(*args, **kwargs):
            attempts.append(repr(args[1:] or args))
            raise OSError("network use in an offline test")
        socket.getaddrinfo = refuse
        socket.socket.connect = refuse
        socket.socket.connect_ex = refuse
        spec = importlib.util.spec_from_file_location("hub_under_test", {str(hub.__file__)!r})
        hub = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(hub)
        try:
            hub.resolve_model({REPO_ID!r}, progress=False)
        except hub.ModelNotFoundError as error:
            print(error)
            print("network attempts:", attempts)
            sys.exit(3)
        sys.exit(0)
    """)
    # The timeout only guards against a hang.
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 3, result.stdout + result.stderr
    message = result.stdout
    assert "HF_HUB_OFFLINE" in message
    assert "--local-dir" in message and "--model DIR" in message
    assert "network attempts: []" in message


def test_download_failure_is_explained(monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    class RepositoryNotFoundError(Exception):  # matched by name, like huggingface_hub's own
        pass

    def not_found(*args, **kwargs):
        raise RepositoryNotFoundError("404")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_found)
    with pytest.raises(ModelNotFoundError, match="no repository org/missing") as caught:
        resolve_model("org/missing", progress=False)
    assert "hf download org/missing --local-dir DIR" in str(caught.value)

    def connection_refused(*args, **kwargs):
        raise ConnectionError("connection refused")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", connection_refused)
    with pytest.raises(ModelNotFoundError, match="connection refused"):
        resolve_model("org/missing", progress=False)


def test_download_uses_snapshot(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "config.json").write_text("{}")
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_model(REPO_ID, revision="main") == snapshot
    (repo_id, kwargs), = calls
    assert repo_id == REPO_ID and kwargs["revision"] == "main" and kwargs["local_files_only"] is False
    patterns = kwargs["allow_patterns"]
    for needed in ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "chat_template.jinja", "model.safetensors", "model.safetensors.index.json"]:
        assert needed in patterns
    assert "model-*-of-*.safetensors" in patterns
    assert not any(pattern.endswith((".bin", ".pth", ".gguf", "*")) for pattern in patterns)


def test_downloaded_repo_without_config(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kwargs: str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model("org/gguf-only", progress=False)
