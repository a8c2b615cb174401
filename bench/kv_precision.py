"""KV cache precision on real models: the next-token distributions with a bf16, f16 or q8_0 KV
cache against the f32 cache, teacher-forced over a 2k-token text (the repository's README).

    python bench/kv_precision.py [--tokens 2048] [--json out.json]

Models (skipped, saying so, when absent):
  SmolLM2-135M-Instruct in bf16 safetensors ($OPENCAMP_MODEL_CACHE/SmolLM2-135M-Instruct, made
    from /work/shared/models as its README says), and
  Gemma 3 270M Q4_K_M GGUF ($OPENCAMP_GEMMA3_DIR/gemma-3-270m-q4_k_m.gguf, from
    `bash ../shared/tools/fetch_gemma3.sh DIR`).
One engine per KV type runs the same chunks (prefill_chunk tokens at a time, every position's
logits); per position: the largest logit error |l - l_f32|, KL(p_f32 || p), and whether the
top token agrees. Prints a table (the README's "KV cache precision"): max abs error, mean and
max KL, top-1 agreement, and the bytes one position takes in each cache. Not a test: the bounds
that fail when a KV type breaks are in tests/cpp/test_kv_cache.cpp (tiny models).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from opencamp import LLM

REPO = Path(__file__).resolve().parents[1]
KV_TYPES = ["f32", "bf16", "f16", "q8_0"]
CHUNK = 256


def models() -> dict[str, Path]:
    cache = Path(os.environ.get("OPENCAMP_MODEL_CACHE", REPO / ".cache" / "models"))
    gemma = Path(os.environ.get("OPENCAMP_GEMMA3_DIR", REPO / ".cache" / "gemma3"))
    return {"SmolLM2-135M bf16": cache / "SmolLM2-135M-Instruct",
            "Gemma 3 270M Q4_K_M": gemma / "gemma-3-270m-q4_k_m.gguf"}


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare(path: Path, n_tokens: int, threads: int | None) -> dict:
    llms = {kv: LLM(path, threads=threads, max_context=n_tokens + 8, kv_cache_dtype=kv) for kv in KV_TYPES}
    text = (REPO / "README.md").read_text()
    ids = llms["f32"].tokenizer.encode(text)
    while len(ids) < n_tokens:
        ids = ids + ids
    ids = ids[:n_tokens]
    seqs = {kv: llm.engine.create_sequence() for kv, llm in llms.items()}
    stats = {kv: {"max_abs": 0.0, "kl": [], "top1": []} for kv in KV_TYPES[1:]}
    for start in range(0, n_tokens, CHUNK):
        chunk = ids[start:start + CHUNK]
        logits = {kv: np.asarray(llms[kv].engine.prefill(seqs[kv], chunk, True)) for kv in KV_TYPES}
        reference = log_softmax(logits["f32"])
        for kv in KV_TYPES[1:]:
            other = log_softmax(logits[kv])
            s = stats[kv]
            s["max_abs"] = max(s["max_abs"], float(np.abs(logits[kv] - logits["f32"]).max()))
            s["kl"].extend((np.exp(reference) * (reference - other)).sum(axis=-1).tolist())
            s["top1"].extend((logits[kv].argmax(-1) == logits["f32"].argmax(-1)).tolist())
    report = {"tokens": n_tokens, "weights": llms["f32"].dtype,
              "bytes_per_position": {kv: llm.engine.cache_stats()["bytes_per_position"] for kv, llm in llms.items()}}
    for kv, s in stats.items():
        report[kv] = {"max_abs_logit_error": s["max_abs"], "mean_kl": float(np.mean(s["kl"])),
                      "max_kl": float(np.max(s["kl"])), "top1_agreement": float(np.mean(s["top1"]))}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results = {}
    for name, path in models().items():
        if not path.exists():
            print(f"{name}: {path} is missing, skipped (see this script's docstring)")
            continue
        results[name] = r = compare(path, args.tokens, args.threads)
        print(f"\n{name} (weights {r['weights']}), {r['tokens']} tokens of README.md, vs the f32 KV cache:")
        print("| KV cache | bytes / position | max abs logit error | mean KL | max KL | top-1 agreement |")
        print("|---|---:|---:|---:|---:|---:|")
        print(f"| f32 | {r['bytes_per_position']['f32']} | 0 | 0 | 0 | 100% |")
        for kv in KV_TYPES[1:]:
            s = r[kv]
            print(f"| {kv} | {r['bytes_per_position'][kv]} | {s['max_abs_logit_error']:.3g} | "
                  f"{s['mean_kl']:.2e} | {s['max_kl']:.2e} | {100 * s['top1_agreement']:.1f}% |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
