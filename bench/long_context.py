"""Decode speed at long contexts for each KV cache type, against llama.cpp in the same run.

    LLAMA_CPP_PYTHON=/path/to/python-with-llama-cpp python bench/long_context.py \
        [--contexts 512,4096,16384] [--steps 16] [--threads 2] [--json out.json]

Files (GGUF, the same for both engines): Gemma 3 270M Q4_K_M ($OPENCAMP_GEMMA3_DIR, see
bench/kv_precision.py) and SmolLM2-135M-Instruct Q4_1 (/work/shared/models). SmolLM2 was trained
to 8192 positions; for the 16k row a copy of its file with llama.context_length 32768 is made
in $OPENCAMP_MODEL_CACHE with gguf's gguf-set-metadata ($GGUF_SET_METADATA, default the one next
to this Python): positions past 8192 only measure speed.

Per engine and KV type one sequence grows through the contexts: the prompt (synthetic ids) is
prefilled up to each context, then `steps` single-token decode steps are timed there; the
prefill of the first context (from an empty cache) is timed too; decode speed is 1 / the median
step time (a shared machine's bursts of other work fall outside the median). Both engines warm up
first (a short prefill and a decode step, not timed). opencamp runs every KV type
(f32, bf16, f16, q8_0; backend auto, prefill in chunks of 256), llama.cpp (llama-cpp-python in its
own process, bench/llama_cpp_runner.py, flash attention on: llama.cpp needs it for a quantised V
cache) f16 and q8_0 caches. `--skip-16k-f32-bf16` leaves out opencamp's f32 and bf16 caches at
the largest context (each one more 16k prefill). `--stall-check 16384`: instead, a
stream decoding on Gemma 3 while a 16k-token prompt arrives (the gaps between its tokens, the
peak memory). Timing only; never pass/fail.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from opencamp import _core
from opencamp.bench import synthetic_prompt

REPO = Path(__file__).resolve().parents[1]
RUNNER = Path(__file__).with_name("llama_cpp_runner.py")
SHARED = Path(os.environ.get("OPENCAMP_SHARED_MODELS", REPO.parent / "shared" / "models"))
CACHE = Path(os.environ.get("OPENCAMP_MODEL_CACHE", REPO / ".cache" / "models"))
GEMMA = Path(os.environ.get("OPENCAMP_GEMMA3_DIR", REPO / ".cache" / "gemma3")) / "gemma-3-270m-q4_k_m.gguf"
KV_TYPES = ["f32", "bf16", "f16", "q8_0"]
LLAMA_KV_TYPES = ["f16", "q8_0"]


def smollm2_long() -> Path:
    """SmolLM2's Q4_1 file with a context length of 32768 (a copy, made once)."""
    source = SHARED / "SmolLM2-135M-Instruct.Q4_1.gguf"
    target = CACHE / "SmolLM2-135M-Instruct.Q4_1.ctx32k.gguf"
    if not target.exists():
        tool = os.environ.get("GGUF_SET_METADATA", str(Path(sys.executable).with_name("gguf-set-metadata")))
        partial = target.with_suffix(".partial")
        shutil.copyfile(source, partial)
        subprocess.run([tool, "--force", str(partial), "llama.context_length", "32768"], check=True,
                       stdout=subprocess.DEVNULL)
        partial.rename(target)
    return target


def time_opencamp(path: Path, kv: str, contexts: list[int], steps: int, threads: int, prompt: list[int]) -> dict:
    engine = _core.Engine(str(path), threads=threads, max_context=max(contexts) + steps * len(contexts) + 16,
                          kv_cache_tokens=max(contexts) + steps * len(contexts) + 16, kv_cache_dtype=kv)
    result = {"kv_type": engine.kv_cache_dtype, "bytes_per_position": engine.cache_stats()["bytes_per_position"],
              "decode_tokens_per_s": {}}
    warm = engine.create_sequence()  # first-call costs (pools, scratch) out of the timings
    engine.prefill(warm, prompt[:64])
    engine.decode([warm], [prompt[0]])
    engine.free_sequence(warm)
    seq = engine.create_sequence()
    done = 0
    for context in contexts:
        start = time.perf_counter()
        engine.prefill(seq, prompt[done:context])
        if done == 0:
            result["prefill_tokens_per_s"] = context / (time.perf_counter() - start)
        done = context
        step_seconds = []
        for i in range(steps):
            start = time.perf_counter()
            engine.decode([seq], [prompt[i]])
            step_seconds.append(time.perf_counter() - start)
        result["decode_tokens_per_s"][str(context)] = 1.0 / statistics.median(step_seconds)
    engine.free_sequence(seq)
    return result


def time_llama_cpp(path: Path, kv: str, contexts: list[int], steps: int, threads: int, prompt: list[int]) -> dict:
    python = os.environ.get("LLAMA_CPP_PYTHON", sys.executable)
    spec = {"contexts": contexts, "decode_steps": steps, "kv_type": kv, "prompt": prompt}
    done = subprocess.run([python, str(RUNNER), "contexts", str(path), str(threads)], input=json.dumps(spec),
                          capture_output=True, text=True)
    if done.returncode != 0:
        return {"kv_type": kv, "error": done.stderr.strip().splitlines()[-1:] or ["failed"]}
    return json.loads(done.stdout)


def stall_check(path: Path, prompt_tokens: int, threads: int, kv: str) -> dict:
    """A stream decoding while a `prompt_tokens` prompt arrives: the longest gap between its
    tokens while the long prompt is prefilled (chunked: 256 tokens a step, between decode
    steps), the decode gaps before it, and the peak resident memory (a score matrix of the long
    prompt would be prompt_tokens^2 * 4 bytes per head)."""
    import resource
    import threading

    from opencamp import LLM

    llm = LLM(path, threads=threads, max_context=prompt_tokens + 64, kv_cache_dtype=kv)
    vocab = llm.config["vocab_size"]
    greedy = _core.SamplingParams()
    greedy.temperature = 0.0
    short = llm.scheduler.submit(synthetic_prompt(32, vocab), max_tokens=100_000, sampling=greedy, ignore_eos=True)
    times = []
    long_request = {}

    def submit_long():
        long_request["submitted"] = time.perf_counter()
        result = llm.scheduler.submit(synthetic_prompt(prompt_tokens, vocab), max_tokens=1, sampling=greedy,
                                      ignore_eos=True).wait()
        long_request["done"] = time.perf_counter()
        long_request["prefill_seconds"] = result["prefill_seconds"]

    submitter = threading.Thread(target=submit_long)
    while len(times) < 40:  # decode a while alone first
        short.next()
        times.append(time.perf_counter())
    submitter.start()
    while submitter.is_alive():
        if short.next() is None:
            break
        times.append(time.perf_counter())
    submitter.join()
    short.cancel()
    alone = [b - a for a, b in zip(times[:39], times[1:40])]
    during = [b - a for a, b in zip(times, times[1:])
              if long_request["submitted"] <= a and b <= long_request["done"]]
    return {"prompt_tokens": prompt_tokens, "kv_type": kv,
            "long_prompt_seconds": long_request["done"] - long_request["submitted"],
            "short_stream_tokens_during": len(during),
            "short_stream_gap_alone_s": max(alone), "short_stream_max_gap_during_s": max(during, default=float("nan")),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", default="512,4096,16384")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="gemma3,smollm2")
    parser.add_argument("--skip-16k-f32-bf16", action="store_true")
    parser.add_argument("--kv-types", default=",".join(KV_TYPES), help="opencamp's, comma-separated")
    parser.add_argument("--llama-kv-types", default=",".join(LLAMA_KV_TYPES), help="llama.cpp's")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--stall-check", type=int, default=0, metavar="TOKENS",
                        help="Only: a stream decoding on Gemma 3 while a prompt of TOKENS arrives.")
    args = parser.parse_args()
    if args.stall_check:
        print(json.dumps(stall_check(GEMMA, args.stall_check, args.threads, "f16"), indent=2))
        return
    contexts = [int(c) for c in args.contexts.split(",")]
    results = {}
    for name in args.models.split(","):
        path = GEMMA if name == "gemma3" else smollm2_long()
        if not path.exists():
            print(f"{name}: {path} is missing, skipped")
            continue
        vocab = _core.load_config(str(path))["vocab_size"]
        prompt = synthetic_prompt(max(contexts), vocab)
        rows = []
        for kv in args.kv_types.split(","):
            ctx = contexts
            if args.skip_16k_f32_bf16 and kv in ("f32", "bf16"):
                ctx = contexts[:-1]
            rows.append({"engine": "opencamp", **time_opencamp(path, kv, ctx, args.steps, args.threads, prompt)})
            print(name, rows[-1], flush=True)
        for kv in args.llama_kv_types.split(","):
            rows.append({"engine": "llama.cpp", **time_llama_cpp(path, kv, contexts, args.steps, args.threads, prompt)})
            print(name, rows[-1], flush=True)
        results[name] = rows
        print(f"\n{name} ({path.name}), {args.threads} threads, decode tokens/s ({args.steps} steps) at each context:")
        print(f"| engine | KV cache | bytes / position | prefill {contexts[0]} tok/s | " +
              " | ".join(f"decode @{c}" for c in contexts) + " |")
        print("|---|---|---:|---:|" + "---:|" * len(contexts))
        for r in rows:
            if "error" in r:
                print(f"| {r['engine']} | {r['kv_type']} | error: {r['error']} |")
                continue
            speeds = [f"{r['decode_tokens_per_s'][str(c)]:.1f}" if str(c) in r["decode_tokens_per_s"] else "-"
                      for c in contexts]
            print(f"| {r['engine']} | {r['kv_type']} | {r.get('bytes_per_position', '')} | "
                  f"{r['prefill_tokens_per_s']:.0f} | " + " | ".join(speeds) + " |")
        llama = {r["kv_type"]: r for r in rows if r["engine"] == "llama.cpp" and "error" not in r}
        for r in rows:
            if r["engine"] == "opencamp" and r["kv_type"] in llama:
                ratios = [f"{r['decode_tokens_per_s'][str(c)] / llama[r['kv_type']]['decode_tokens_per_s'][str(c)]:.2f}x"
                          for c in contexts if str(c) in r["decode_tokens_per_s"]]
                prefill = r["prefill_tokens_per_s"] / llama[r["kv_type"]]["prefill_tokens_per_s"]
                print(f"opencamp / llama.cpp, KV {r['kv_type']}: prefill {prefill:.2f}x, decode " + ", ".join(ratios))
        for r in rows:
            d = r.get("decode_tokens_per_s", {})
            if str(contexts[-1]) in d:
                print(f"{r['engine']} {r['kv_type']}: decode @{contexts[-1]} = "
                      f"{100 * d[str(contexts[-1])] / d[str(contexts[0])]:.0f}% of decode @{contexts[0]}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
