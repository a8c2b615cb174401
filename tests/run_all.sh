#!/usr/bin/env bash
# Every test, from a fresh clone: build and run the C++ suite (ctest), then install the Python
# package into a fresh virtual environment and run the Python suite (pytest).
#
# Needs: python3 (3.10+) with venv, a C++20 compiler, cmake >= 3.21, and the shared models
# folder (../shared/models next to the repository, or OPENCAMP_SHARED_MODELS) for the tests on
# the real SmolLM2 model.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${OPENCAMP_TEST_VENV:-.venv-test}
jobs=${OPENCAMP_TEST_JOBS:-$(nproc 2>/dev/null || echo 2)}

echo "== C++: configure, build (warnings are errors), ctest"
generator=()
command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)
cmake -S . -B build/tests "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DOPENCAMP_WERROR=ON
cmake --build build/tests -j "$jobs"
ctest --test-dir build/tests --output-on-failure -j "$jobs"

echo "== Python: install into $venv, pytest"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet ".[test]"
"$venv/bin/python" -m pytest -q -ra tests/python "$@"
