"""`opencamp serve` on GGUF models resolved the ways users name them, without any network: a
Hub repo with a quantisation tag found in the Hugging Face cache, and a local file."""
from __future__ import annotations

from pathlib import Path

import httpx
from conftest import SMOLLM2_QUESTION
from serverkit import ServeProcess

COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def fake_gguf_repo(hf_home: Path, repo_id: str, smollm2_gguf: Path) -> Path:
    """A Hub repo of two GGUF files as huggingface_hub caches it: the real Q4_1 file and a Q8_0
    stand-in that is never read (only the chosen file is)."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot / "SmolLM2-135M-Instruct.Q4_1.gguf").symlink_to(smollm2_gguf)
    (snapshot / "SmolLM2-135M-Instruct.Q8_0.gguf").write_bytes(b"GGUF not a model")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def ask(url: str, model: str) -> dict:
    return httpx.post(url + "/v1/chat/completions", timeout=120, json={
        "model": model, "temperature": 0, "max_tokens": 16,
        "messages": [{"role": "user", "content": SMOLLM2_QUESTION}]}).json()


def test_serve_a_tagged_gguf_repo_from_the_hub_cache_offline(tmp_path: Path, smollm2_gguf: Path):
    snapshot = fake_gguf_repo(tmp_path / "hf", "example-org/SmolLM2-GGUF", smollm2_gguf)
    model = "example-org/SmolLM2-GGUF:q4_1"
    process = ServeProcess(["--model", model, "--threads", "2", "--max-context", "512"],
                           env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    try:
        url = process.wait_ready(timeout=300)
        assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == [model]
        answer = ask(url, model)
        assert answer["choices"][0]["message"]["content"] == "The capital of France is Paris."
    finally:
        assert process.stop() == 0, process.output
    out = process.output
    assert f"from {snapshot / 'SmolLM2-135M-Instruct.Q4_1.gguf'} (Q4_1 GGUF)" in out
    assert "weights q4_1 (mixed: 210 q4_1, 1 q8_0)" in out


def test_serve_a_gguf_file_by_its_name(smollm2_gguf: Path):
    process = ServeProcess(["--model", str(smollm2_gguf), "--threads", "2", "--max-context", "512"])
    try:
        url = process.wait_ready(timeout=300)
        assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == [smollm2_gguf.name]
        answer = ask(url, smollm2_gguf.name)
        assert answer["choices"][0]["message"]["content"] == "The capital of France is Paris."
    finally:
        assert process.stop() == 0, process.output
