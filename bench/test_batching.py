"""Serving many users at once: continuous batching and prefix reuse, measured on the CPU.

    pip install ".[bench]" llama-cpp-python
    pytest bench/test_batching.py -s --benchmark-columns=mean,rounds

* Aggregate decode tokens/s for 1, 4, 8 and 16 concurrent streams through the scheduler (each
  step reads the weights once for all streams), and the ratio to one stream (target: 8 streams
  give at least 4x).
* Time to first token of a second chat turn over a 1,000-token history against the first turn
  (target: under 10%): the second turn continues the first's sequence and only prefills its
  own tokens.
* The same concurrent load on llama.cpp through llama-cpp-python, in the same run: its Python
  server runs one sequence at a time (no slots), so N streams are served one after another;
  its aggregate is what N queued clients get. Skipped, and said so, without the package.

Not part of the pass/fail suite (timing never is). Ratios, not absolutes: these machines are
shared and noisy.
"""
from __future__ import annotations

import time

import pytest

import opencamp
from opencamp.bench import synthetic_prompt

PROMPT_TOKENS = 64
GEN_TOKENS = 64
REPORT: list[str] = []


@pytest.fixture(scope="module")
def llm(smollm2_dir):
    return opencamp.LLM(smollm2_dir, threads=2, max_context=2048, kv_cache_tokens=16 * 2048,
                        max_running=16)


def aggregate_decode(llm, streams: int) -> float:
    """Tokens per second over all streams, from submitting to the last token (the short
    prompts' prefills included, as a real burst of users has them)."""
    vocab = llm.config["vocab_size"]
    start = time.perf_counter()
    requests = [llm.scheduler.submit(synthetic_prompt(PROMPT_TOKENS + i, vocab), max_tokens=GEN_TOKENS,
                                     ignore_eos=True) for i in range(streams)]
    tokens = sum(len(r.wait()["tokens"]) for r in requests)
    return tokens / (time.perf_counter() - start)


@pytest.mark.parametrize("streams", [1, 4, 8, 16])
def test_aggregate_decode(benchmark, llm, streams):
    rates = []
    benchmark.pedantic(lambda: rates.append(aggregate_decode(llm, streams)), rounds=3, warmup_rounds=1)
    best = max(rates)
    benchmark.extra_info.update(tokens_per_s=best, streams=streams)
    single = getattr(test_aggregate_decode, "single", None)
    if streams == 1:
        test_aggregate_decode.single = best
    ratio = f" = {best / single:.2f}x one stream" if single else ""
    REPORT.append(f"{streams:2d} streams: {best:7.1f} tokens/s aggregate{ratio}")
    print("\n" + REPORT[-1])


def test_second_turn_time_to_first_token(benchmark, llm):
    """A 1,000-token first turn, then a short follow-up on the same session."""
    history = " ".join(f"Fact {i}: the number {i} squared is {i * i}." for i in range(56))
    ratios = []

    def two_turns():
        with llm.session() as chat:
            first = chat.send(history + "\nWhich fact mentions 49?", max_tokens=8, stream=True)
            first.text()
            second = chat.send("And which mentions 64?", max_tokens=8, stream=True)
            second.text()
            ratios.append((first.completion, second.completion))

    benchmark.pedantic(two_turns, rounds=3, warmup_rounds=1)
    first, second = min(ratios, key=lambda pair: pair[1].time_to_first_token / pair[0].time_to_first_token)
    ratio = second.time_to_first_token / first.time_to_first_token
    benchmark.extra_info.update(first_ttft=first.time_to_first_token, second_ttft=second.time_to_first_token)
    REPORT.append(f"time to first token: turn 1 ({first.prompt_tokens} prompt tokens) "
                  f"{1e3 * first.time_to_first_token:.1f} ms, turn 2 ({second.prompt_tokens} prompt "
                  f"tokens, {second.cached_tokens} reused) {1e3 * second.time_to_first_token:.1f} ms "
                  f"= {100 * ratio:.1f}% of turn 1")
    print("\n" + REPORT[-1])


@pytest.mark.parametrize("streams", [1, 8])
def test_llama_cpp_same_load(smollm2_dir, llm, streams, request):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: "
                                    "the llama.cpp comparison is skipped")
    gguf = request.getfixturevalue("gguf_dir") / "SmolLM2-135M-Instruct.bf16.gguf"
    model = llama_cpp.Llama(model_path=str(gguf), n_ctx=2048, n_threads=2, n_threads_batch=2,
                            n_batch=512, verbose=False)
    vocab = llm.config["vocab_size"]
    start = time.perf_counter()
    tokens = 0
    for i in range(streams):  # one sequence at a time, as its server serves queued clients
        model.reset()
        model.eval(synthetic_prompt(PROMPT_TOKENS + i, vocab))
        for _ in range(GEN_TOKENS):
            token = model.sample(temp=0.0)
            model.eval([token])
            tokens += 1
    rate = tokens / (time.perf_counter() - start)
    model.close()
    ours = aggregate_decode(llm, streams)
    REPORT.append(f"{streams:2d} streams, same run: llama.cpp {rate:7.1f} tokens/s, opencamp "
                  f"{ours:7.1f} tokens/s = {ours / rate:.2f}x")
    print("\n" + REPORT[-1])


def teardown_module():
    if REPORT:
        print("\n\ncontinuous batching (SmolLM2-135M-Instruct bf16, 2 threads):")
        for line in REPORT:
            print("  " + line)
