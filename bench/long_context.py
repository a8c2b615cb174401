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
prefill of the first context (from an empty cache) is timed too. opencamp runs every KV type
(f32, bf16, f16, q8_0; backend auto, prefill in chunks of 256), llama.cpp (llama-cpp-python in its
own process, bench/llama_cpp_runner.py, flash attention on: llama.cpp needs it for a quantised V
cache) f16 and q8_0 caches. `--skip-16k-f32-bf16` leaves out opencamp's f32 and bf16 caches at
the largest context of SmolLM2 (each one more 16k prefill). Timing only; never pass/fail.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
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
    seq = engine.create_sequence()
    done = 0
    for context in contexts:
        start = time.perf_counter()
        engine.prefill(seq, prompt[done:context])
        if done == 0:
            result["prefill_tokens_per_s"] = context / (time.perf_counter() - start)
        done = context
        start = time.perf_counter()
        for i in range(steps):
            engine.decode([seq], [prompt[i]])
        result["decode_tokens_per_s"][str(context)] = steps / (time.perf_counter() - start)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", default="512,4096,16384")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="gemma3,smollm2")
    parser.add_argument("--skip-16k-f32-bf16", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
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
        for kv in KV_TYPES:
            ctx = contexts
            if args.skip_16k_f32_bf16 and name == "smollm2" and kv in ("f32", "bf16"):
                ctx = contexts[:-1]
            rows.append({"engine": "opencamp", **time_opencamp(path, kv, ctx, args.steps, args.threads, prompt)})
            print(name, rows[-1], flush=True)
        for kv in LLAMA_KV_TYPES:
            rows.append({"engine": "llama.cpp", **time_llama_cpp(path, kv, contexts, args.steps, args.threads, prompt)})
            print(name, rows[-1], flush=True)
        results[name] = rows
        print(f"\n{name} ({path.name}), {args.threads} threads, decode tokens/s ({args.steps} steps) at each context:")
        print("| engine | KV cache | bytes / position | prefill 512 tok/s | " +
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
