"""Benchmarks reuse the test suite's model fixtures (SmolLM2 materialised once into a cache)."""
import importlib.util
import sys
from pathlib import Path

_path = Path(__file__).resolve().parents[1] / "tests" / "python" / "conftest.py"
_spec = importlib.util.spec_from_file_location("conftest_paths", _path)
_fixtures = importlib.util.module_from_spec(_spec)
sys.modules["conftest_paths"] = _fixtures  # the paths (SHARED, SMOLLM2) for benchmark modules
_spec.loader.exec_module(_fixtures)

smollm2_dir = _fixtures.smollm2_dir  # a pytest fixture, re-exported
