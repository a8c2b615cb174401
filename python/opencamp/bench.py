"""Prefill and decode speed of one model on one backend, with the physical limits beside them:
tokens/s, achieved GFLOP/s for the prefill (compute-bound) and GB/s of weights for the decode
(memory-bound: every weight is read once per token).

Used by `opencamp bench` and by the benchmarks in bench/.
"""
from __future__ import annotations

import platform
import time

from . import _core
from .llm import LLM


def synthetic_prompt(n_tokens: int, vocab_size: int) -> list[int]:
    """Deterministic, varied token ids (no tokenizer needed): the same prompt for every engine."""
    return [(i * 7919 + 13) % vocab_size for i in range(n_tokens)]


def prefill_flops(config: dict, n_tokens: int) -> float:
    """Multiply-adds x 2 of a prefill: every projection for every token, causal attention, and
    the output head for the last token only (the only logits a prefill needs)."""
    d, f, layers = config["hidden_size"], config["intermediate_size"], config["num_layers"]
    q_dim = config["num_heads"] * config["head_dim"]
    kv_dim = config["num_kv_heads"] * config["head_dim"]
    per_token = layers * (d * q_dim + 2 * d * kv_dim + q_dim * d + 3 * d * f)
    attention = layers * 2 * q_dim * n_tokens * (n_tokens + 1) / 2  # QK and PV over causal pairs
    head = config["vocab_size"] * d
    return 2.0 * (per_token * n_tokens + attention + head)


def run(model: str, backend: str = "auto", dtype: str = "auto", threads: int | None = None,
        prompt_tokens: int = 512, gen_tokens: int = 128, repeat: int = 3,
        llm: LLM | None = None, kv_cache_dtype: str = "auto") -> dict:
    """Best of `repeat` prefills of `prompt_tokens`, then `gen_tokens` decode steps timed on their
    own after a prefill (never stopping early at an end-of-sequence token)."""
    if prompt_tokens < 1 or gen_tokens < 1 or repeat < 1:
        raise ValueError("prompt_tokens, gen_tokens and repeat must be >= 1")
    if llm is None:
        llm = LLM(model, backend=backend, dtype=dtype, threads=threads, kv_cache_dtype=kv_cache_dtype)
    engine, config = llm.engine, llm.config
    if prompt_tokens + gen_tokens + 1 > engine.max_context:
        raise ValueError(f"prompt_tokens + gen_tokens ({prompt_tokens + gen_tokens}) exceed the "
                         f"context of {engine.max_context} positions")
    prompt = synthetic_prompt(prompt_tokens, config["vocab_size"])

    prefill_seconds = float("inf")
    for _ in range(repeat):
        seq = engine.create_sequence()
        try:
            start = time.perf_counter()
            engine.prefill(seq, prompt)
            prefill_seconds = min(prefill_seconds, time.perf_counter() - start)
        finally:
            engine.free_sequence(seq)

    decode_seconds = float("inf")
    for _ in range(repeat):
        seq = engine.create_sequence()
        try:
            # gen_tokens + 1 tokens: the first comes from the prefill's logits, each later one
            # costs exactly one decode step.
            result = llm.scheduler.submit(prompt, seq=seq, max_tokens=gen_tokens + 1,
                                          ignore_eos=True).wait()
            decode_steps = len(result["tokens"]) - 1
            if decode_steps != gen_tokens:  # the speed below would be for other work
                raise RuntimeError(f"decode stopped after {decode_steps} of {gen_tokens} steps "
                                   f"({result['finish_reason']})")
            decode_seconds = min(decode_seconds, result["decode_seconds"])
        finally:
            engine.free_sequence(seq)

    decode_tps = gen_tokens / decode_seconds
    return {
        "model": str(llm.model_path),
        "model_type": config["model_type"],
        "backend": engine.backend,
        "backend_description": next((b["description"] for b in _core.backends()
                                     if b["name"] == engine.backend), ""),
        "dtype": engine.dtype,
        "matmul_activation_dtype": engine.matmul_activation_dtype,
        "kv_cache_dtype": engine.kv_cache_dtype,
        "kv_bytes_per_position": engine.cache_stats()["bytes_per_position"],
        "threads": engine.threads,
        "machine": platform.processor() or platform.machine(),
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "decode_steps": decode_steps,  # taken, as timed (== gen_tokens, checked above)
        "prefill_seconds": prefill_seconds,
        "prefill_tokens_per_s": prompt_tokens / prefill_seconds,
        "prefill_gflop_per_s": prefill_flops(config, prompt_tokens) / prefill_seconds / 1e9,
        "decode_seconds": decode_seconds,
        "decode_tokens_per_s": decode_tps,
        "weight_bytes": engine.weight_bytes,
        "decode_gb_per_s": decode_tps * engine.weight_bytes / 1e9,
    }
