"""Model resolution: local folders and GGUF files, and Hub repo ids (with quantisation tags)
without touching the network."""
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


def test_a_file_that_is_not_gguf(tmp_path: Path) -> None:
    file = tmp_path / "model.bin"
    file.write_bytes(b"PK\x03\x04")
    with pytest.raises(ModelNotFoundError, match="is a file but not a GGUF file"):
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


def _resolve_offline(model: str, hf_home: Path) -> subprocess.CompletedProcess:
    """resolve_model(model) offline, in a fresh interpreter: huggingface_hub reads HF_HOME /
    HF_HUB_OFFLINE when imported, so setting them in this process would not reach an already
    imported huggingface_hub. Every name lookup and connection there is refused and recorded
    (printed on failure): offline must mean no attempt."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(hf_home))
    env.pop("HF_HUB_CACHE", None)
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
            print(hub.resolve_model({model!r}, progress=False))
        except hub.ModelNotFoundError as error:
            print(error)
            print("network attempts:", attempts)
            sys.exit(3)
    """)
    # The timeout only guards against a hang.
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=120)


def test_offline_without_cache_fails_without_touching_the_network(tmp_path: Path) -> None:
    result = _resolve_offline(REPO_ID, tmp_path / "hf-home")
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


def test_downloaded_repo_without_config_nor_gguf(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kwargs: str(tmp_path))
    monkeypatch.setattr(huggingface_hub, "list_repo_files",
                        lambda repo_id, **kwargs: ["README.md", "model.onnx"])
    with pytest.raises(ModelNotFoundError, match="org/empty has no GGUF files and no config.json"):
        resolve_model("org/empty", progress=False)


# ---- GGUF files: local, and Hub repos with a quantisation tag --------------------------------

def write_gguf(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(16))
    return path


def test_gguf_file(tmp_path: Path) -> None:
    gguf = write_gguf(tmp_path / "model-Q4_K_M.gguf")
    assert resolve_model(gguf) == gguf.resolve()
    assert resolve_model(str(gguf)) == gguf.resolve()


def test_a_linked_gguf_keeps_its_own_path(tmp_path: Path) -> None:
    # As in a Hugging Face cache: snapshots/COMMIT/model.gguf -> blobs/SHA (a name without .gguf).
    blob = write_gguf(tmp_path / "blobs" / "3f2a9c")
    link = tmp_path / "snapshots" / "abc" / "model-Q4_K_M.gguf"
    link.parent.mkdir(parents=True)
    link.symlink_to(blob)
    assert resolve_model(link) == link


def test_folder_with_one_gguf_is_that_file(tmp_path: Path) -> None:
    gguf = write_gguf(tmp_path / "model-Q8_0.gguf")
    write_gguf(tmp_path / "mmproj-model-f16.gguf")  # a vision projector, not a model
    (tmp_path / "README.md").write_text("hi")
    assert resolve_model(tmp_path) == gguf.resolve()


def test_folder_with_several_ggufs_asks_which(tmp_path: Path) -> None:
    write_gguf(tmp_path / "model-Q8_0.gguf")
    write_gguf(tmp_path / "model-Q4_0.gguf")
    with pytest.raises(ModelNotFoundError, match="holds 2 GGUF files") as caught:
        resolve_model(tmp_path)
    assert "model-Q4_0.gguf, model-Q8_0.gguf" in str(caught.value)


def test_checkpoint_folder_wins_over_a_gguf_in_it(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    write_gguf(tmp_path / "model-Q8_0.gguf")
    assert resolve_model(tmp_path) == tmp_path.resolve()


@pytest.mark.parametrize("model, expected", [
    ("owner/repo:Q4_K_M", ("owner/repo", "Q4_K_M")), ("owner/repo", ("owner/repo", None)),
    ("owner/repo:q8_0", ("owner/repo", "q8_0")), ("smollm2", ("smollm2", None)),
    ("not a repo:Q4_0", ("not a repo:Q4_0", None)), ("owner/repo:", ("owner/repo:", None)),
])
def test_split_tag(model: str, expected) -> None:
    assert hub.split_tag(model) == expected


@pytest.mark.parametrize("filename, tag", [
    ("Llama-3.2-1B-Instruct-Q4_K_M.gguf", "Q4_K_M"), ("gemma-3-270m-q4_k_m.gguf", "Q4_K_M"),
    ("qwen2.5-0.5b-instruct-q8_0.gguf", "Q8_0"), ("SmolLM2-135M-Instruct.Q4_1.gguf", "Q4_1"),
    ("model.i1-IQ4_XS.gguf", "IQ4_XS"), ("sub/model-UD-Q4_K_XL-00001-of-00002.gguf", "Q4_K_XL"),
    ("model-BF16.gguf", "BF16"), ("model-f16.gguf", "F16"), ("Qwen2-7B.gguf", None),
])
def test_gguf_tag(filename: str, tag) -> None:
    assert hub.gguf_tag(filename) == tag


REPO_FILES = ["README.md", ".gitattributes", "model-Q4_0.gguf", "model-Q4_K_M.gguf",
              "model-Q4_K_S.gguf", "model-Q8_0.gguf", "mmproj-model-f16.gguf",
              "big/model-Q6_K-00001-of-00002.gguf", "big/model-Q6_K-00002-of-00002.gguf"]


@pytest.mark.parametrize("tag, expected", [
    ("Q4_K_M", "model-Q4_K_M.gguf"), ("q4_k_m", "model-Q4_K_M.gguf"), ("Q4_K_S", "model-Q4_K_S.gguf"),
    ("Q8_0", "model-Q8_0.gguf"), (None, "model-Q4_K_M.gguf"), ("model-Q4_0.gguf", "model-Q4_0.gguf"),
])
def test_choose_gguf(tag, expected: str) -> None:
    assert hub.choose_gguf(REPO_FILES, tag, "owner/repo") == expected


def test_choose_gguf_lists_the_tags_when_none_matches() -> None:
    with pytest.raises(ModelNotFoundError, match="no file for the tag 'Q5_K_M'") as caught:
        hub.choose_gguf(REPO_FILES, "Q5_K_M", "owner/repo")
    assert "Its tags: Q4_0, Q4_K_M, Q4_K_S, Q6_K, Q8_0" in str(caught.value)
    assert "--model owner/repo:Q4_0" in str(caught.value)
    # Q4_K is not Q4_K_M: tags match whole.
    with pytest.raises(ModelNotFoundError, match="no file for the tag 'Q4_K'"):
        hub.choose_gguf(REPO_FILES, "Q4_K", "owner/repo")


def test_choose_gguf_without_tag_and_without_q4_k_m() -> None:
    assert hub.choose_gguf(["only-Q8_0.gguf"], None, "o/r") == "only-Q8_0.gguf"
    with pytest.raises(ModelNotFoundError, match="none is Q4_K_M"):
        hub.choose_gguf(["a-Q8_0.gguf", "a-Q4_0.gguf"], None, "o/r")


def test_choose_gguf_refuses_split_files() -> None:
    with pytest.raises(ModelNotFoundError, match="split over 2 files") as caught:
        hub.choose_gguf(REPO_FILES, "Q6_K", "owner/repo")
    assert "llama-gguf-split --merge" in str(caught.value)


def test_hub_gguf_downloads_the_chosen_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    downloaded = write_gguf(tmp_path / "blobs" / "model-Q8_0.gguf")
    calls = []
    monkeypatch.setattr(huggingface_hub, "list_repo_files",
                        lambda repo_id, revision=None: calls.append(("list", repo_id, revision))
                        or REPO_FILES)

    def fake_hf_hub_download(repo_id, filename, revision=None):
        calls.append(("download", repo_id, filename, revision))
        return str(downloaded)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda *args, **kwargs: pytest.fail("a tag asks for one file only"))
    assert resolve_model("owner/repo:Q8_0", revision="v1", progress=False) == downloaded
    assert calls == [("list", "owner/repo", "v1"),
                     ("download", "owner/repo", "model-Q8_0.gguf", "v1")]


def test_hub_gguf_repo_without_tag(tmp_path: Path, monkeypatch) -> None:
    # No config.json in the snapshot: a GGUF repo, so the default tag is fetched.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(tmp_path))
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, revision=None: REPO_FILES)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo_id, filename, revision=None: str(tmp_path / filename))
    assert resolve_model("owner/repo", progress=False) == tmp_path / "model-Q4_K_M.gguf"


def test_hub_gguf_errors_are_explained(monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    class GatedRepoError(Exception):
        pass

    def gated(*args, **kwargs):
        raise GatedRepoError("403")

    monkeypatch.setattr(huggingface_hub, "list_repo_files", gated)
    with pytest.raises(ModelNotFoundError, match="gated repository"):
        resolve_model("org/gated:Q4_K_M", progress=False)

    class LocalEntryNotFoundError(Exception):
        pass

    def unreachable(*args, **kwargs):
        raise ConnectionError("no route to host")

    def not_cached(*args, **kwargs):
        raise LocalEntryNotFoundError("not in the cache")

    monkeypatch.setattr(huggingface_hub, "list_repo_files", unreachable)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_cached)
    with pytest.raises(ModelNotFoundError, match="no route to host") as caught:
        resolve_model("org/model:Q4_K_M", progress=False)
    assert "hf download org/model --local-dir DIR" in str(caught.value)


def _fake_gguf_cache(hf_home: Path, repo_id: str, files: list[str]) -> Path:
    """What huggingface_hub leaves after downloading files of `repo_id`: refs/main -> a snapshot."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    for name in files:
        write_gguf(repo / "snapshots" / commit / name)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def test_hub_gguf_found_in_the_cache_offline(tmp_path: Path) -> None:
    snapshot = _fake_gguf_cache(tmp_path / "hf", "owner/repo", ["model-Q4_K_M.gguf",
                                                                "model-Q8_0.gguf"])
    result = _resolve_offline("owner/repo:q8_0", tmp_path / "hf")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == str(snapshot / "model-Q8_0.gguf")
    result = _resolve_offline("owner/repo", tmp_path / "hf")
    assert result.stdout.strip() == str(snapshot / "model-Q4_K_M.gguf")
    # A tag the cache does not hold: the error lists what it has.
    result = _resolve_offline("owner/repo:Q6_K", tmp_path / "hf")
    assert result.returncode == 3 and "Its tags: Q4_K_M, Q8_0" in result.stdout


def test_hub_gguf_offline_not_cached(tmp_path: Path) -> None:
    result = _resolve_offline("owner/repo:Q4_K_M", tmp_path / "hf")
    assert result.returncode == 3
    assert "HF_HUB_OFFLINE" in result.stdout and "--local-dir" in result.stdout
    assert "network attempts: []" in result.stdout
