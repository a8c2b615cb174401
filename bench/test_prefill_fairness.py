"""A short request's time to first token while a long prompt prefills, under load (issue 9).

    pytest bench/test_prefill_fairness.py -s
    python bench/test_prefill_fairness.py MODEL_DIR [--step-tokens N ...]   # any opencamp build

An 8,000-token prompt is submitted to SmolLM2-135M's scheduler while 4 chats are decoding;
during its prefill three 32-token prompts follow one after the other, when it is about 10%,
50% and 90% through (late in a long prefill a step is dearest: each of its tokens attends to
thousands of keys). Reported: each short prompt's time to first token (target: under 1 s on
SmolLM2 here; and, for scale on a shared machine, the same prompt's with only the chats
running), the long prompt's whole prefill (its throughput, which a fairer rule must not
wreck) and the longest gap between two tokens of the decoding chats.

For scale: with prompts served in arrival order a short prompt waits for the whole long
prefill, which is also what a client queued behind it waits on a server that runs one sequence
at a time (llama-cpp-python's server; llama.cpp itself is not run here).

Not part of the pass/fail suite (timing never is); the machine is shared, so numbers are noisy.
"""
from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

LONG_TOKENS = 8000
SHORT_TOKENS = 32
DECODERS = 4
ARRIVALS = (0.1, 0.5, 0.9)  # how far through the long prefill each short prompt arrives


def synthetic_prompt(n_tokens: int, vocab_size: int, salt: int = 0) -> list[int]:
    return [(i * 7919 + 13 + salt * 104729) % vocab_size for i in range(n_tokens)]


def measure(model_dir: str, threads: int = 2, step_tokens: int | None = None) -> dict:
    from opencamp import _core

    engine = _core.Engine(str(model_dir), threads=threads, max_context=8192,
                          kv_cache_tokens=8192 + 2048)
    options = {} if step_tokens is None else {"step_tokens": step_tokens}
    scheduler = _core.Scheduler(engine, max_running=8, **options)
    vocab = engine.config["vocab_size"]

    # The load: chats decoding all along, each token's arrival time recorded.
    token_times: list[list[float]] = [[] for _ in range(DECODERS)]
    decoders = [scheduler.submit(synthetic_prompt(24, vocab, salt=10 + i), max_tokens=100000,
                                 ignore_eos=True) for i in range(DECODERS)]
    stop = threading.Event()

    def read(i: int) -> None:
        while not stop.is_set() and decoders[i].next(600) is not None:
            token_times[i].append(time.perf_counter())

    readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(DECODERS)]
    for reader in readers:
        reader.start()
    while min(len(t) for t in token_times) < 2:
        time.sleep(0.01)

    # For scale on a machine others share: the same short prompt with only the chats running.
    submitted = time.perf_counter()
    alone = scheduler.submit(synthetic_prompt(SHORT_TOKENS, vocab, salt=99), max_tokens=1,
                             ignore_eos=True)
    alone.next(600)
    alone_ttft = time.perf_counter() - submitted
    alone.wait()

    def prompt_tokens_through() -> int:
        s = scheduler.stats()
        return s["batch_tokens"] - s["steps"] * DECODERS  # minus the decode tokens

    base = prompt_tokens_through()
    start = time.perf_counter()
    long_request = scheduler.submit(synthetic_prompt(LONG_TOKENS, vocab), max_tokens=1,
                                    ignore_eos=True)
    short_ttfts, extra = [], 0
    for k, fraction in enumerate(ARRIVALS):
        while prompt_tokens_through() - base - extra < fraction * LONG_TOKENS:
            time.sleep(0.002)
        submitted = time.perf_counter()
        short = scheduler.submit(synthetic_prompt(SHORT_TOKENS, vocab, salt=1 + k), max_tokens=1,
                                 ignore_eos=True)
        short.next(600)
        short_ttfts.append(time.perf_counter() - submitted)
        short.wait()
        extra += SHORT_TOKENS
    long_request.next(600)
    long_done = time.perf_counter()
    gaps = [b - a for times in token_times for a, b in zip(times, times[1:])
            if a >= start and b <= long_done]
    stop.set()
    for d in decoders:
        d.cancel()
    for reader in readers:
        reader.join(60)
    scheduler.shutdown()
    return {"step_tokens": scheduler.step_tokens, "short_ttft_s": short_ttfts,
            "alone_ttft_s": alone_ttft,
            "long_prefill_s": long_done - start,
            "long_tokens_per_s": LONG_TOKENS / (long_done - start),
            "decode_max_gap_s": max(gaps) if gaps else float("nan")}


def report(result: dict) -> str:
    ttfts = ", ".join(f"{f:.0%}: {t:.3f} s" for f, t in zip(ARRIVALS, result["short_ttft_s"]))
    return (f"step_tokens {result['step_tokens']}: a {SHORT_TOKENS}-token prompt's TTFT during a "
            f"{LONG_TOKENS}-token prefill ({DECODERS} chats decoding), arriving at {ttfts} "
            f"(target < 1 s; without the long prompt {result['alone_ttft_s']:.3f} s); the long "
            f"prefill {result['long_prefill_s']:.1f} s "
            f"({result['long_tokens_per_s']:.0f} tokens/s); the decoding chats' longest gap "
            f"between tokens {result['decode_max_gap_s']:.2f} s")


def test_short_request_ttft_during_long_prefill(smollm2_dir):
    print("\n" + report(measure(smollm2_dir)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--step-tokens", type=int, nargs="*", default=[None],
                        help="scheduler step budgets to compare (default: the scheduler's)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    for step_tokens in args.step_tokens:
        print(report(measure(str(args.model_dir), args.threads, step_tokens)), flush=True)
