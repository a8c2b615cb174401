"""opencamp against llama.cpp on this CPU: same machine, same threads, same weights, same run.

    pip install ".[bench]" llama-cpp-python
    pytest bench/test_cpu_speed.py -s --benchmark-columns=mean,stddev,rounds

For SmolLM2-135M-Instruct in bf16 and f32, with 1 and 2 threads: prefill of 128 and 512 tokens
and 128 decode steps, each timed with opencamp (pytest-benchmark) and then with llama.cpp
through the llama-cpp-python package on GGUF files converted from the same Q4_1 GGUF with
llama.cpp's own quantize API (so both run the very same dequantised weights). Every case prints
tokens/s, GFLOP/s (prefill) or GB/s of weights (decode), the machine's read bandwidth measured in
the same run, and the ratio opencamp / llama.cpp. Ratios, not absolute numbers, are what to
compare: these machines are shared and noisy. Without llama-cpp-python the llama.cpp half is
skipped and said so.

Not part of the pass/fail suite (timing never is).
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

import opencamp
from opencamp import _core
from opencamp.bench import prefill_flops, synthetic_prompt

CASES = [("prefill", 128), ("prefill", 512), ("decode", 128)]
DECODE_CONTEXT = 64  # tokens in the cache before the timed decode steps
REPORT: list[str] = []


@pytest.fixture(scope="session")
def bandwidth() -> dict[int, float]:
    return {threads: _core.measure_read_bandwidth(threads=threads) for threads in (1, 2)}


@pytest.fixture(scope="module", params=["bf16", "f32"])
def dtype(request) -> str:
    return request.param


_engines: dict = {}


def opencamp_llm(smollm2_dir, dtype: str, threads: int):
    key = (dtype, threads)
    if key not in _engines:
        _engines.clear()  # one model in memory at a time
        _engines[key] = opencamp.LLM(smollm2_dir, dtype=dtype, threads=threads, max_context=1024)
    return _engines[key]


def time_opencamp(benchmark, llm, phase: str, n: int) -> float:
    """Seconds for the phase, best of the benchmark's rounds."""
    engine = llm.engine
    prompt = synthetic_prompt(n if phase == "prefill" else DECODE_CONTEXT, llm.config["vocab_size"])
    if phase == "prefill":
        def once():
            seq = engine.create_sequence()
            engine.prefill(seq, prompt)
            engine.free_sequence(seq)

        benchmark.pedantic(once, rounds=3, warmup_rounds=1)
    else:
        def fresh_context():  # not timed: a sequence holding DECODE_CONTEXT tokens
            seq = engine.create_sequence()
            engine.prefill(seq, prompt)
            return (seq,), {}

        def decode_steps(seq):
            for i in range(n):
                engine.decode([seq], [prompt[i % len(prompt)]])
            engine.free_sequence(seq)

        benchmark.pedantic(decode_steps, setup=fresh_context, rounds=3, warmup_rounds=1)
    return benchmark.stats.stats.min


def time_llama_cpp(gguf: Path, threads: int, phase: str, n: int, vocab: int) -> float:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=1024, n_threads=threads,
                          n_threads_batch=threads, n_batch=512, n_ubatch=512, verbose=False)
    prompt = synthetic_prompt(n if phase == "prefill" else DECODE_CONTEXT, vocab)
    best = float("inf")
    for _ in range(4):  # the first run warms up
        llm.reset()
        if phase == "prefill":
            start = time.perf_counter()
            llm.eval(prompt)
        else:
            llm.eval(prompt)
            start = time.perf_counter()
            for i in range(n):
                llm.eval([prompt[i % len(prompt)]])
        best = min(best, time.perf_counter() - start)
    llm.close()
    return best


def describe(config, weight_bytes, phase, n, seconds) -> str:
    tps = n / seconds
    if phase == "prefill":
        return f"{tps:8.1f} tok/s {prefill_flops(config, n) / seconds / 1e9:7.1f} GFLOP/s"
    return f"{tps:8.1f} tok/s {tps * weight_bytes / 1e9:7.1f} GB/s"


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("phase,n", CASES, ids=[f"{p}{n}" for p, n in CASES])
def test_speed(benchmark, smollm2_dir, dtype, threads, phase, n, bandwidth, request):
    llm = opencamp_llm(smollm2_dir, dtype, threads)
    ours = time_opencamp(benchmark, llm, phase, n)
    config, weight_bytes = llm.config, llm.engine.weight_bytes
    line = (f"{dtype:4s} {threads}t {phase:7s} {n:4d}: opencamp {describe(config, weight_bytes, phase, n, ours)}")
    if phase == "decode":
        line += f" ({100 * n / ours * weight_bytes / 1e9 / bandwidth[threads]:.0f}% of {bandwidth[threads]:.1f} GB/s)"
    benchmark.extra_info.update(tokens_per_s=n / ours, backend=llm.backend, dtype=dtype)
    try:
        gguf_dir = request.getfixturevalue("gguf_dir")
    except pytest.skip.Exception as skipped:
        REPORT.append(line + f" | llama.cpp skipped: {skipped}")
        print("\n" + REPORT[-1])
        return
    theirs = time_llama_cpp(gguf_dir / f"SmolLM2-135M-Instruct.{dtype}.gguf", threads, phase, n,
                            config["vocab_size"])
    line += f" | llama.cpp {describe(config, weight_bytes, phase, n, theirs)} | ratio {theirs / ours:.2f}x"
    benchmark.extra_info.update(llama_cpp_tokens_per_s=n / theirs, ratio=theirs / ours)
    REPORT.append(line)
    print("\n" + line)


def teardown_module():
    if REPORT:
        print("\n\nopencamp vs llama.cpp, same run (" + (_core.backends()[0]["description"]) + "):")
        for line in REPORT:
            print("  " + line)
