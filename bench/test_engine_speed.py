"""Prefill and decode speed of the engine on SmolLM2-135M-Instruct.

    pip install ".[bench]" && pytest bench -s --benchmark-columns=mean,stddev,rounds

Each case prints tokens/s and achieved GB/s (decode reads every weight once per token), so the
distance to the memory-bandwidth limit is visible. Not part of the pass/fail suite.
"""
import time

import pytest

import opencamp

PROMPT_TOKENS = 64
DECODE_TOKENS = 16


@pytest.fixture(scope="module", params=["bf16", "f32"])
def llm(request, smollm2_dir):
    return opencamp.LLM(smollm2_dir, dtype=request.param, threads=None, max_context=1024)


def synthetic_prompt(n: int, vocab: int) -> list[int]:
    return [(i * 7919 + 13) % vocab for i in range(n)]


def test_prefill(benchmark, llm):
    ids = synthetic_prompt(PROMPT_TOKENS, llm.config["vocab_size"])

    def prefill():
        seq = llm.engine.create_sequence()
        llm.engine.prefill(seq, ids)
        llm.engine.free_sequence(seq)

    benchmark.pedantic(prefill, rounds=3, warmup_rounds=1)
    seconds = benchmark.stats.stats.mean
    print(f"\n[{llm.backend} {llm.dtype} {llm.threads}t] prefill {PROMPT_TOKENS} tokens: "
          f"{PROMPT_TOKENS / seconds:.1f} tokens/s")


def test_decode(benchmark, llm):
    ids = synthetic_prompt(PROMPT_TOKENS, llm.config["vocab_size"])
    seq = llm.engine.create_sequence()
    llm.engine.prefill(seq, ids)

    def decode_steps():
        start = time.perf_counter()
        for i in range(DECODE_TOKENS):
            llm.engine.decode([seq], [ids[i]])
        return time.perf_counter() - start

    benchmark.pedantic(lambda: (decode_steps(), llm.engine.truncate_sequence(seq, PROMPT_TOKENS)),
                       rounds=3, warmup_rounds=1)
    llm.engine.free_sequence(seq)
    tokens_per_s = DECODE_TOKENS / benchmark.stats.stats.mean
    print(f"\n[{llm.backend} {llm.dtype} {llm.threads}t] decode: {tokens_per_s:.1f} tokens/s, "
          f"{tokens_per_s * llm.engine.weight_bytes / 1e9:.2f} GB/s of weights")
