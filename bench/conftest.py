"""Benchmarks reuse the test suite's model fixtures (SmolLM2 materialised once into a cache)."""
import ctypes
import importlib.util
import sys
from pathlib import Path

import pytest

_path = Path(__file__).resolve().parents[1] / "tests" / "python" / "conftest.py"
_spec = importlib.util.spec_from_file_location("conftest_paths", _path)
_fixtures = importlib.util.module_from_spec(_spec)
sys.modules["conftest_paths"] = _fixtures  # the paths (SHARED, SMOLLM2) for benchmark modules
_spec.loader.exec_module(_fixtures)

smollm2_dir = _fixtures.smollm2_dir  # a pytest fixture, re-exported


@pytest.fixture(scope="session")
def gguf_dir(smollm2_dir) -> Path:
    """The shared Q4_1 GGUF converted to BF16 and F32 by llama.cpp's own quantize API (once,
    cached): llama.cpp then runs the very weights opencamp runs (both dequantised from it)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: "
                                    "the llama.cpp half of the comparison is skipped")
    out = smollm2_dir.parent / "gguf"
    out.mkdir(exist_ok=True)
    source = _fixtures.SHARED / f"{_fixtures.SMOLLM2}.Q4_1.gguf"
    for name, ftype in [("bf16", llama_cpp.LLAMA_FTYPE_MOSTLY_BF16), ("f32", llama_cpp.LLAMA_FTYPE_ALL_F32)]:
        target = out / f"{_fixtures.SMOLLM2}.{name}.gguf"
        if target.exists():
            continue
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.allow_requantize = True  # Q4_1/Q8_0 -> dequantised -> bf16 / f32
        partial = target.with_suffix(".partial")
        if llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params)) != 0:
            pytest.fail(f"llama.cpp could not convert {source} to {name}")
        partial.rename(target)
    return out
