"""A short request's time to first token while a long prompt prefills (issue 9, fair service).

    pytest bench/test_prefill_fairness.py -s
    python bench/test_prefill_fairness.py MODEL_DIR   # any opencamp build: before/after numbers

An 8,000-token prompt is submitted to SmolLM2-135M's scheduler; once its prefill has begun, a
32-token prompt follows. With prompts served in arrival order the short one waited for the whole
long prefill; with the fairness rule (decode tokens first, then the prompt with the fewest
tokens left) its first token comes one step (one chunk, step_tokens=256) later. Target: under
1 s on SmolLM2 here. For scale the same run times the long prompt's whole prefill, which is
what a client queued behind it waits on a server that runs one sequence at a time (llama-cpp-
python's server); llama.cpp itself is not run here: its Python server has no concurrent
sequences, so its answer is that prefill time plus the short prompt's own.

Not part of the pass/fail suite (timing never is); the machine is shared, so numbers are noisy.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

LONG_TOKENS = 8000
SHORT_TOKENS = 32


def synthetic_prompt(n_tokens: int, vocab_size: int, salt: int = 0) -> list[int]:
    return [(i * 7919 + 13 + salt * 104729) % vocab_size for i in range(n_tokens)]


def measure(model_dir: str, threads: int = 2) -> dict:
    from opencamp import _core

    engine = _core.Engine(str(model_dir), threads=threads, max_context=8192,
                          kv_cache_tokens=8192 + 1024)
    scheduler = _core.Scheduler(engine, max_running=8)
    vocab = engine.config["vocab_size"]
    long_prompt = synthetic_prompt(LONG_TOKENS, vocab)
    short_prompt = synthetic_prompt(SHORT_TOKENS, vocab, salt=1)
    start = time.perf_counter()
    long_request = scheduler.submit(long_prompt, max_tokens=1, ignore_eos=True)
    while scheduler.stats()["steps"] < 1:  # its prefill has begun
        time.sleep(0.001)
    short_submitted = time.perf_counter()
    short_request = scheduler.submit(short_prompt, max_tokens=1, ignore_eos=True)
    short_request.next(600)
    short_first = time.perf_counter()
    long_done_before_short = long_request.finished
    long_request.next(600)
    long_first = time.perf_counter()
    scheduler.shutdown()
    return {"short_ttft_s": short_first - short_submitted,
            "long_prefill_s": long_first - start,
            "long_prefill_done_before_short_token": long_done_before_short,
            "long_tokens_per_s": LONG_TOKENS / (long_first - start)}


def report(result: dict) -> str:
    return (f"short request ({SHORT_TOKENS} tokens) TTFT during a {LONG_TOKENS}-token prefill: "
            f"{result['short_ttft_s']:.3f} s (target < 1 s); the long prefill took "
            f"{result['long_prefill_s']:.2f} s ({result['long_tokens_per_s']:.0f} tokens/s; a "
            f"client queued behind it on a one-sequence server waits that long); long prefill "
            f"finished first: {result['long_prefill_done_before_short_token']}")


def test_short_request_ttft_during_long_prefill(smollm2_dir):
    print("\n" + report(measure(smollm2_dir)))


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).exists():
        sys.exit(f"usage: {sys.argv[0]} MODEL_DIR")
    print(report(measure(sys.argv[1])))
