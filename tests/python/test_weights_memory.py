"""Weights live in the engine's own memory: a model file that is overwritten or truncated after
load (as `cp` over it does) changes no logit and cannot crash the process (it used to die of
SIGBUS on the next request, reading a mapping of the shrunken file). Each case runs in a child
process, so a crash fails the test instead of killing pytest."""
import json
import shutil
import subprocess
import sys

import pytest

from conftest import FIXTURES

CHILD = r"""
import json, os, sys
from opencamp import _core
path, backend = sys.argv[1], sys.argv[2]
engine = _core.Engine(path, backend=backend, threads=1, max_context=64)
def logits():
    seq = engine.create_sequence()
    try:
        return engine.prefill(seq, [1, 5, 9, 2, 7], all_positions=True).tolist()
    finally:
        engine.free_sequence(seq)
before = logits()
weights = path if os.path.isfile(path) else os.path.join(path, "model.safetensors")
size = os.path.getsize(weights)
with open(weights, "r+b") as f:        # overwritten in place with other bytes ...
    f.write(os.urandom(min(size, 1 << 16)))
os.truncate(weights, size // 3)          # ... and truncated under the running engine
print(json.dumps({"before": before, "after": logits()}))
"""


def run_child(path, backend: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(path), backend], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, f"the child died ({done.returncode}):\n{done.stderr[-2000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("backend", ["cpu", "avx"])
def test_safetensors_file_changed_after_load(tmp_path, backend):
    model = shutil.copytree(FIXTURES / "tiny-qwen2", tmp_path / "model")
    result = run_child(model, backend)
    assert len(result["before"]) == 5  # logits at every prompt position
    assert result["after"] == result["before"]


@pytest.mark.parametrize("backend", ["cpu", "avx"])
@pytest.mark.parametrize("name", ["tiny-llama.f32.gguf", "tiny-qwen3.q4_1.gguf"])
def test_gguf_file_changed_after_load(tmp_path, backend, name):
    model = shutil.copy(FIXTURES / "tiny-gguf" / name, tmp_path / name)
    result = run_child(model, backend)
    assert len(result["before"]) == 5  # logits at every prompt position
    assert result["after"] == result["before"]
