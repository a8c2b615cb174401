#!/usr/bin/env bash
# The cuda backend's check on a machine with an NVIDIA GPU: build with the backend required,
# ctest (the cuda tests must run, not skip), the Python parity and SmolLM2 golden tests on
# backend "cuda" in f32 and bf16, and `opencamp bench` on SmolLM2 in bf16 and f32 next to HF
# transformers on the same GPU and weights. Results land in $OUT (default build/gpu-check-out):
# summary.txt, results.json and the logs (8 files at most, as the device tool returns them).
#
# Written for the `device` tool's machines (no network; python3 with torch, transformers,
# scikit-build-core, pybind11; nvcc, cmake, ninja). SmolLM2's GGUF (94 MiB) is more than one call
# may carry (64 MiB), so it travels in two halves on two calls to the same warm machine:
#
#   here, once (needs ../shared/models and pip's network):
#       bench/gpu/gpu_check.sh prepare       # -> .gpu-carry/a and .gpu-carry/b (git-ignored)
#   device, right after each other (the machine stays warm for 30 s):
#       run(command="bash bench/gpu/gpu_check.sh stage", carry=[".gpu-carry/a"], timeout_s=120)
#       run(command="bash bench/gpu/gpu_check.sh run",   carry=[".gpu-carry/b"], timeout_s=600)
#
# `run` without the staged half still builds, tests and runs the tiny-model parity tests, and
# says that the SmolLM2 steps were skipped. A failing step does not stop the next ones; the exit
# status is 1 when any failed. Budget: about 7 minutes of the second call on an H100.
set -uo pipefail
cd "$(dirname "$0")/../.."

OUT=${OUT:-build/gpu-check-out}
STAGE=build/gpu-stage          # ignored, so it survives between calls on a warm machine
CARRY=.gpu-carry
MODEL_NAME=SmolLM2-135M-Instruct
GGUF_NAME=$MODEL_NAME.Q4_1.gguf

die() {
  echo "gpu_check: $*" >&2
  exit 1
}

prepare() {
  local shared=${OPENCAMP_SHARED_MODELS:-../shared/models}
  local gguf=$shared/$GGUF_NAME tool=$shared/../tools/gguf_to_safetensors.py
  [ -f "$gguf" ] || die "$gguf is missing (set OPENCAMP_SHARED_MODELS to the shared models folder)"
  [ -f "$tool" ] || die "$tool is missing"
  grep -qx "/$CARRY/" .git/info/exclude 2>/dev/null || echo "/$CARRY/" >> .git/info/exclude
  rm -rf "$CARRY"
  mkdir -p "$CARRY/a" "$CARRY/b/models" "$CARRY/b/tools" "$CARRY/b/wheels"
  local size half
  size=$(stat -c %s "$gguf")
  half=$((size / 2))
  head -c "$half" "$gguf" > "$CARRY/a/model.part-a"
  tail -c +"$((half + 1))" "$gguf" > "$CARRY/b/model.part-b"
  sha256sum < "$gguf" | cut -d' ' -f1 > "$CARRY/b/model.sha256"
  cp -r "$shared/$MODEL_NAME" "$CARRY/b/models/"
  chmod -R u+w "$CARRY/b/models"
  cp "$tool" "$CARRY/b/tools/"
  # The converter's one package the device image lacks (pure Python).
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d "$CARRY/b/wheels" gguf || die "pip could not fetch the gguf wheel"
  du -sh "$CARRY/a" "$CARRY/b"
  echo "next: device run 'bash bench/gpu/gpu_check.sh stage' carrying $CARRY/a, then 'bash bench/gpu/gpu_check.sh run' carrying $CARRY/b"
}

stage() {
  [ -f "$CARRY/a/model.part-a" ] || die "$CARRY/a/model.part-a did not travel (carry $CARRY/a)"
  mkdir -p "$STAGE"
  cp "$CARRY/a/model.part-a" "$STAGE/"
  ls -la "$STAGE"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
}

failures=0
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }

# step NAME LOG SECONDS command...: runs it with a time limit, logs it, records ok / FAILED.
step() {
  local name=$1 log=$2 limit=$3
  shift 3
  local start=$SECONDS rc
  echo "== $name: $*" >> "$log"
  timeout "$limit" "$@" >> "$log" 2>&1
  rc=$?
  if [ "$rc" -eq 0 ]; then
    summary "$(printf '%-34s ok      %4ds' "$name" $((SECONDS - start)))"
  else
    summary "$(printf '%-34s FAILED  %4ds  (rc %d, see %s)' "$name" $((SECONDS - start)) "$rc" "$(basename "$log")")"
    failures=$((failures + 1))
  fi
  return "$rc"
}

opencamp_cli() { python3 -c 'from opencamp.cli import main; main()' "$@"; }

run() {
  mkdir -p "$OUT" "$STAGE"
  : > "$OUT/summary.txt"
  local jobs
  jobs=$(nproc)
  export CMAKE_BUILD_PARALLEL_LEVEL=$jobs
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || summary "nvidia-smi failed: is there a GPU?"
  summary "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null)"
  summary "nvcc: $(nvcc --version 2>/dev/null | tail -2 | head -1)"

  # 1. build, the backend required, warnings as errors (as CI)
  local build=build/gpu
  step "configure (OPENCAMP_CUDA=ON)" "$OUT/build.log" 120 \
    cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DOPENCAMP_CUDA=ON -DOPENCAMP_WERROR=ON
  step "build" "$OUT/build.log" 400 cmake --build "$build" -j "$jobs"

  # 2. C++ tests: the three that exercise cuda run on their own so their numbers are kept
  step "ctest (the rest)" "$OUT/ctest.log" 300 \
    ctest --test-dir "$build" --output-on-failure -j 8 -E "test_cuda|test_backend_ops|test_engine"
  step "test_cuda" "$OUT/cuda_tests.log" 300 "$build/tests/cpp/test_cuda"
  step "test_backend_ops (cuda vs cpu)" "$OUT/cuda_tests.log" 300 \
    bash -o pipefail -c "$build/tests/cpp/test_backend_ops | grep -E ' cuda |ok|FAILED|failures'"
  step "test_engine (cuda vs HF fixtures)" "$OUT/cuda_tests.log" 300 \
    bash -o pipefail -c "$build/tests/cpp/test_engine | grep -E 'cuda|ok|FAILED|failures'"

  # 3. the Python package with the backend compiled in
  if ls "$CARRY"/b/wheels/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$CARRY"/b/wheels/*.whl && export PYTHONPATH=/tmp/site
  fi
  step "pip install . (OPENCAMP_CUDA=ON)" "$OUT/pytest.log" 400 \
    python3 -m pip install --no-build-isolation --no-deps --force-reinstall --no-cache-dir \
      -C cmake.define.OPENCAMP_CUDA=ON -C build-dir=build/gpu-pip .
  step "python: cuda usable" "$OUT/pytest.log" 60 python3 -c \
    'import sys, opencamp; b = {x["name"]: x for x in opencamp.backends()}; print(b.get("cuda")); sys.exit(0 if b.get("cuda", {}).get("usable") else 1)'

  # 4. SmolLM2's safetensors from the GGUF halves (the conversion tests/python/conftest.py does)
  local model="" shared="$PWD/$STAGE/shared"
  if [ -f "$STAGE/model.part-a" ] && [ -f "$CARRY/b/model.part-b" ]; then
    mkdir -p "$shared/models" "$shared/tools" "$STAGE/cache"
    cat "$STAGE/model.part-a" "$CARRY/b/model.part-b" > "$shared/models/$GGUF_NAME"
    if [ "$(sha256sum < "$shared/models/$GGUF_NAME" | cut -d' ' -f1)" = "$(cat "$CARRY/b/model.sha256")" ]; then
      rm -rf "$shared/models/$MODEL_NAME" "$STAGE/cache/$MODEL_NAME"
      cp -r "$CARRY/b/models/$MODEL_NAME" "$shared/models/"
      cp "$CARRY/b/tools/gguf_to_safetensors.py" "$shared/tools/"
      cp -r "$shared/models/$MODEL_NAME" "$STAGE/cache/$MODEL_NAME"
      if step "SmolLM2 safetensors from GGUF" "$OUT/pytest.log" 300 \
          python3 "$shared/tools/gguf_to_safetensors.py" "$shared/models/$GGUF_NAME" "$STAGE/cache/$MODEL_NAME"; then
        model="$PWD/$STAGE/cache/$MODEL_NAME"
        export OPENCAMP_SHARED_MODELS="$shared/models" OPENCAMP_MODEL_CACHE="$PWD/$STAGE/cache"
        export OPENCAMP_SMOLLM2_DIR="$model"
      fi
    else
      summary "SmolLM2: the two GGUF halves do not add up (sha256 differs): SmolLM2 steps skipped"
      failures=$((failures + 1))
    fi
  else
    summary "SmolLM2: no staged GGUF half (run 'stage' first, on the same warm machine): SmolLM2 steps skipped"
  fi

  # 5. parity (tiny models vs transformers) and the SmolLM2 golden answer: "auto" is cuda here,
  #    and the parametrised tests are kept to their cuda instances
  local tests=(tests/python/test_parity.py)
  [ -n "$model" ] && tests+=(tests/python/test_smollm2.py)
  step "pytest ${tests[*]##*/} (cuda)" "$OUT/pytest.log" 400 \
    python3 -m pytest -q -rA -p no:cacheprovider "${tests[@]}" -k "not avx and not cpu"

  # 6. speed: opencamp vs transformers on the same GPU and weights
  if [ -n "$model" ]; then
    local dtype
    for dtype in bf16 f32; do
      step "opencamp bench cuda $dtype" "$OUT/bench.log" 300 bash -o pipefail -c \
        "$(declare -f opencamp_cli); opencamp_cli bench --model '$model' --backend cuda --dtype $dtype --json \
           --no-bandwidth --prompt-tokens 512 --gen-tokens 128 --repeat 3 | tail -1 > '$STAGE/bench_$dtype.json'"
    done
    step "transformers bench (bf16, f32)" "$OUT/bench.log" 300 bash -o pipefail -c \
      "python3 bench/gpu/hf_bench.py '$model' --prompt-tokens 512 --gen-tokens 128 | tail -1 > '$STAGE/hf.json'"
    cat "$STAGE"/bench_*.json "$STAGE/hf.json" >> "$OUT/bench.log" 2>/dev/null
    python3 - "$OUT/results.json" "$STAGE/bench_bf16.json" "$STAGE/bench_f32.json" "$STAGE/hf.json" \
      >> "$OUT/summary.txt" 2>&1 <<'PY'
import json
import sys

out, bf16_path, f32_path, hf_path = sys.argv[1:]


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        return {"error": f"{path}: {e}"}


ours = {"bf16": load(bf16_path), "f32": load(f32_path)}
hf = load(hf_path)
# Nominal memory bandwidth (GB/s) of the cards these machines have, by name.
nominal = {"H200": 4800, "H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100 NVL": 3900,
           "A100-SXM4-80GB": 2039, "A100-SXM4-40GB": 1555, "A100 80GB PCIe": 1935}
gpu = hf.get("gpu", "")
card = next((v for k, v in nominal.items() if k in gpu), None)
results = {"gpu": gpu, "copy_gb_per_s": hf.get("copy_gb_per_s"), "nominal_gb_per_s": card,
           "opencamp": ours, "transformers": hf.get("transformers", {}), "ratios": {}}
print(f"gpu {gpu}: copy {hf.get('copy_gb_per_s', float('nan')):.0f} GB/s (read + written), nominal {card} GB/s")
for dtype, mine in ours.items():
    theirs = results["transformers"].get(dtype, {})
    if "decode_tokens_per_s" not in mine or "decode_tokens_per_s" not in theirs:
        print(f"{dtype}: incomplete ({mine.get('error') or theirs.get('error') or 'missing'})")
        continue
    r = {"decode": mine["decode_tokens_per_s"] / theirs["decode_tokens_per_s"],
         "prefill": mine["prefill_tokens_per_s"] / theirs["prefill_tokens_per_s"]}
    if hf.get("copy_gb_per_s"):
        r["decode_fraction_of_copy_bandwidth"] = mine["decode_gb_per_s"] / hf["copy_gb_per_s"]
    if card:
        r["decode_fraction_of_nominal_bandwidth"] = mine["decode_gb_per_s"] / card
    results["ratios"][dtype] = r
    print(f"{dtype}: opencamp decode {mine['decode_tokens_per_s']:.0f} tok/s ({mine['decode_gb_per_s']:.0f} GB/s of "
          f"weights), prefill {mine['prefill_tokens_per_s']:.0f} tok/s; transformers decode "
          f"{theirs['decode_tokens_per_s']:.0f} tok/s, prefill {theirs['prefill_tokens_per_s']:.0f} tok/s; "
          f"ratios decode {r['decode']:.2f}x prefill {r['prefill']:.2f}x")
with open(out, "w") as f:
    json.dump(results, f, indent=1)
PY
  fi

  summary "$([ "$failures" -eq 0 ] && echo "all steps passed" || echo "$failures step(s) failed")"
  [ "$failures" -eq 0 ]
}

case "${1:-run}" in
  prepare) prepare ;;
  stage) stage ;;
  run) run ;;
  *) die "usage: $0 prepare|stage|run" ;;
esac
