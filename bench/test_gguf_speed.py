"""opencamp against llama.cpp on GGUF files: same machine, same files, same threads, same run.

    LLAMA_CPP_PYTHON=/path/to/python-with-llama-cpp pytest bench/test_gguf_speed.py -s

The shared SmolLM2-135M-Instruct Q4_1 file, and Q8_0, Q4_0, Q4_K_M, Q6_K and BF16 files made from
it by llama.cpp's own quantize API (Q4_1 -> BF16 with allow_requantize, then BF16 -> each type:
the BF16 GGUF holds exactly the Q4_1 file's dequantised weights). For each file, 2 threads and
1: a 512-token prefill and 128 decode steps after a 64-token context, best of 3 rounds, first
with opencamp (`_core.Engine` on the file, backend auto), then with llama.cpp (llama-cpp-python,
run in its own process by bench/llama_cpp_runner.py: LLAMA_CPP_PYTHON names the interpreter that
has it, default this one). Prints tokens/s, GB/s of the weights each decode step reads (every
matrix once, the output head included; not the embedding table, of which one row is read), the
share of the read bandwidth measured in the same run, and the ratios opencamp / llama.cpp.
Without llama-cpp-python the comparison is skipped and says so. Timing is never pass/fail.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opencamp import _core
from opencamp.bench import synthetic_prompt

import conftest_paths as paths

PREFILL, DECODE_STEPS, DECODE_CONTEXT, ROUNDS = 512, 128, 64, 3
# File name suffix -> llama.cpp ftype it is made with (None: the shared file itself).
FILES = {"Q4_1": None, "Q8_0": "MOSTLY_Q8_0", "Q4_0": "MOSTLY_Q4_0", "Q4_K_M": "MOSTLY_Q4_K_M",
         "Q6_K": "MOSTLY_Q6_K", "BF16": "MOSTLY_BF16"}
RUNNER = Path(__file__).with_name("llama_cpp_runner.py")
REPORT: list[str] = []


def llama_python() -> str:
    return os.environ.get("LLAMA_CPP_PYTHON", sys.executable)


def llama_cpp_available() -> bool:
    return subprocess.run([llama_python(), "-c", "import llama_cpp"], capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def bandwidth() -> dict[int, float]:
    return {threads: _core.measure_read_bandwidth(threads=threads) for threads in (1, 2)}


@pytest.fixture(scope="session")
def gguf_files(smollm2_dir) -> dict[str, Path]:
    """The files, made once into the model cache next to SmolLM2 (as bench/conftest.py does)."""
    source = paths._require_shared(paths.SHARED / f"{paths.SMOLLM2}.Q4_1.gguf")
    files = {"Q4_1": source}
    if not llama_cpp_available():
        pytest.skip(f"{llama_python()} has no llama_cpp (set LLAMA_CPP_PYTHON): the other files are "
                    "made by llama.cpp's quantize API, and llama.cpp is the comparison")
    out = smollm2_dir.parent / "gguf"
    out.mkdir(exist_ok=True)
    def target_of(name: str) -> Path:  # the BF16 file under bench/conftest.py's name for it
        return out / f"{paths.SMOLLM2}.{'bf16' if name == 'BF16' else name}.gguf"

    bf16 = target_of("BF16")
    for name, ftype in [("BF16", "MOSTLY_BF16")] + [(n, f) for n, f in FILES.items() if f and n != "BF16"]:
        target = target_of(name)
        if not target.exists():
            partial = target.with_suffix(f".{os.getpid()}.partial")
            subprocess.run([llama_python(), str(RUNNER), "quantize", str(source if name == "BF16" else bf16),
                            str(partial), ftype], check=True, capture_output=True)
            partial.rename(target)
        files[name] = target
    return files


def time_opencamp(engine, vocab: int) -> tuple[float, float]:
    """Best prefill and decode seconds of ROUNDS rounds after a warm-up."""
    prompt = synthetic_prompt(PREFILL, vocab)
    context = synthetic_prompt(DECODE_CONTEXT, vocab)
    prefill = decode = float("inf")
    for _ in range(ROUNDS + 1):
        seq = engine.create_sequence()
        start = time.perf_counter()
        engine.prefill(seq, prompt)
        prefill = min(prefill, time.perf_counter() - start)
        engine.free_sequence(seq)
        seq = engine.create_sequence()
        engine.prefill(seq, context)
        start = time.perf_counter()
        for i in range(DECODE_STEPS):
            engine.decode([seq], [context[i % len(context)]])
        decode = min(decode, time.perf_counter() - start)
        engine.free_sequence(seq)
    return prefill, decode


def time_llama_cpp(path: Path, threads: int, vocab: int) -> dict:
    spec = {"prefill": synthetic_prompt(PREFILL, vocab), "decode_context": synthetic_prompt(DECODE_CONTEXT, vocab),
            "decode_steps": DECODE_STEPS, "rounds": ROUNDS}
    done = subprocess.run([llama_python(), str(RUNNER), "time", str(path), str(threads)], input=json.dumps(spec),
                          capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": f"llama.cpp exited with {done.returncode}: {done.stderr.strip()[-200:]}"}
    return json.loads(done.stdout)


@pytest.mark.parametrize("threads", [2, 1])
@pytest.mark.parametrize("name", list(FILES))
def test_gguf_speed(gguf_files, bandwidth, name, threads):
    path = gguf_files[name]
    engine = _core.Engine(str(path), backend="auto", threads=threads, max_context=1024)
    vocab, weight_bytes = engine.config["vocab_size"], engine.weight_bytes
    prefill, decode = time_opencamp(engine, vocab)
    del engine
    decode_tps, prefill_tps = DECODE_STEPS / decode, PREFILL / prefill
    gbs = decode_tps * weight_bytes / 1e9
    line = (f"{name:6s} {threads}t {weight_bytes / 1e6:5.0f} MB/token | opencamp prefill {prefill_tps:7.1f} tok/s, "
            f"decode {decode_tps:6.1f} tok/s {gbs:5.1f} GB/s ({100 * gbs / bandwidth[threads]:3.0f}% of "
            f"{bandwidth[threads]:.1f})")
    theirs = time_llama_cpp(path, threads, vocab)
    if "error" in theirs:
        line += f" | llama.cpp: {theirs['error']}"
    else:
        their_prefill, their_decode = PREFILL / theirs["prefill_s"], DECODE_STEPS / theirs["decode_s"]
        line += (f" | llama.cpp prefill {their_prefill:7.1f}, decode {their_decode:6.1f} tok/s "
                 f"{their_decode * weight_bytes / 1e9:5.1f} GB/s"
                 f"{'' if theirs['extra_buffers'] else ' (extra buffers off)'}"
                 f" | ratio prefill {prefill_tps / their_prefill:4.2f}x decode {decode_tps / their_decode:4.2f}x")
    REPORT.append(line)
    print("\n" + line)


def teardown_module():
    if REPORT:
        print("\n\nopencamp vs llama.cpp on GGUF files, same run (" + _core.backends()[0]["description"] + "):")
        for line in REPORT:
            print("  " + line)
