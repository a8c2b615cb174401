"""Load time and resident memory of a 1B-shaped model: opencamp against llama.cpp, same weights.

    python bench/load_memory.py [--cache DIR] [--threads 2] [--runs 3]

Writes (once, into DIR, default .cache/bench-1b) a random model shaped like Llama 3.2 1B
(hidden 2048, 16 layers, ffn 8192, 32 query / 8 KV heads of 64, vocabulary 128,256, tied
embedding) in BF16, twice: a Hugging Face folder (config.json + model.safetensors) and the same
tensors as a GGUF file. Then, each in a fresh process and with the files in the page cache
(a first untimed load reads them):

- opencamp from the safetensors folder and from the GGUF file (avx backend, dtype auto);
- llama.cpp (llama-cpp-python, only installed for benchmarking) from the GGUF file, mmap on
  (its default) and off.

It prints, best of --runs: load seconds, resident memory after load (VmRSS) and its peak
(VmHWM), each less the interpreter's own before the load, next to the weights' bytes plus the
KV cache's bytes (the issue's bound: resident after load <= 1.15x that), and ratios to
llama.cpp. Timing only: not part of the pass/fail suite.
"""
from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

HIDDEN, LAYERS, FFN, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 2048, 16, 8192, 32, 8, 64, 128256
CONTEXT = 2048  # positions of KV cache both engines allocate


def tensor_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
            p + "mlp.gate_proj.weight": (FFN, HIDDEN),
            p + "mlp.up_proj.weight": (FFN, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, FFN),
        })
    return shapes


def random_bf16(shape: tuple[int, ...], rng: np.random.Generator, norm: bool) -> np.ndarray:
    """bf16 bits (uint16) of N(0, 0.02) weights, or of values near 1 for norm weights."""
    values = (1.0 + 0.01 * rng.standard_normal(shape, dtype=np.float32)) if norm else \
        (0.02 * rng.standard_normal(shape, dtype=np.float32))
    return (values.view(np.uint32) >> 16).astype(np.uint16)


def write_models(cache: Path) -> tuple[Path, Path]:
    folder, gguf_path = cache / "llama-1b-bf16", cache / "llama-1b-bf16.gguf"
    if (folder / "model.safetensors").exists() and gguf_path.exists():
        return folder, gguf_path
    import gguf  # the gguf package writes the GGUF twin (installed with the test extra)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shapes = tensor_shapes()
    tensors = {name: random_bf16(shape, rng, norm=len(shape) == 1) for name, shape in shapes.items()}
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": FFN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "vocab_size": VOCAB,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    }))
    # safetensors by hand: numpy has no bf16 for the safetensors package to take.
    header, offset = {}, 0
    for name, bits in tensors.items():
        header[name] = {"dtype": "BF16", "shape": list(bits.shape), "data_offsets": [offset, offset + bits.nbytes]}
        offset += bits.nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    partial = folder / "model.safetensors.partial"
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for bits in tensors.values():
            f.write(bits.tobytes())
    partial.rename(folder / "model.safetensors")

    writer = gguf.GGUFWriter(str(gguf_path) + ".partial", "llama")
    writer.add_context_length(131072)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    # A SentencePiece-style vocabulary of placeholder pieces: what llama.cpp needs to load.
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"<t{i}>" for i in range(VOCAB)])
    writer.add_token_scores([0.0] * VOCAB)
    writer.add_token_types([1] * VOCAB)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    modules = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
    for name, bits in tensors.items():
        if name not in names:
            _, _, layer, rest = name.split(".", 3)
            module = rest.rsplit(".", 1)[0]
            names[name] = f"blk.{layer}.{modules[module]}.weight"
        # Random weights: the rope row order llama.cpp's converter uses does not matter here.
        if bits.ndim == 1:
            writer.add_tensor(names[name], (bits.astype(np.uint32) << 16).view(np.float32))
        else:
            # A raw type's shape is given in bytes: the uint8 view's.
            writer.add_tensor(names[name], bits.view(np.uint8).reshape(bits.shape[0], -1),
                              raw_dtype=gguf.GGMLQuantizationType.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    Path(str(gguf_path) + ".partial").rename(gguf_path)
    return folder, gguf_path


# Runs in a fresh interpreter: the imports first (their memory is the baseline), then the load.
PROBE = r"""
import json, sys, time
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
engine, path, threads, context = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if engine == "opencamp":
    from opencamp import _core
else:
    import llama_cpp
base = status("VmRSS")
start = time.perf_counter()
if engine == "opencamp":
    model = _core.Engine(path, backend="avx", dtype="auto", threads=threads, max_context=context,
                         kv_cache_tokens=context)
    weight_bytes = model.weight_bytes
else:
    model = llama_cpp.Llama(model_path=path, n_ctx=context, n_threads=threads, verbose=False,
                            use_mmap=engine == "llama.cpp-mmap")
    weight_bytes = None
load_s = time.perf_counter() - start
print(json.dumps({"load_s": load_s, "rss": status("VmRSS") - base, "peak": status("VmHWM") - base,
                  "weight_bytes": weight_bytes}))
"""


def probe(engine: str, path: Path, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, engine, str(path), str(threads), str(CONTEXT)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{engine} on {path} failed:\n{out.stderr}")
    out = out.stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=Path(__file__).resolve().parents[1] / ".cache" / "bench-1b")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-llama-cpp", action="store_true", help="only opencamp")
    args = parser.parse_args()
    folder, gguf_path = write_models(args.cache)
    file_bytes = sum(int(np.prod(s)) * 2 for s in tensor_shapes().values())
    kv_bytes = 2 * LAYERS * KV_HEADS * HEAD_DIM * 4 * CONTEXT  # f32 keys and values
    cases = [("opencamp", folder, "opencamp, safetensors"), ("opencamp", gguf_path, "opencamp, GGUF")]
    if not args.no_llama_cpp:
        cases += [("llama.cpp-mmap", gguf_path, "llama.cpp, GGUF, mmap"),
                  ("llama.cpp-read", gguf_path, "llama.cpp, GGUF, no mmap")]
    print(f"1B-shaped llama, BF16: {file_bytes / 1e9:.2f} GB of weights in the files, "
          f"KV cache f32 {CONTEXT} positions = {kv_bytes / 1e9:.3f} GB, {args.threads} threads")
    results = {}
    for engine, path, label in cases:
        probe(engine, path, args.threads)  # warm the page cache
        runs = [probe(engine, path, args.threads) for _ in range(args.runs)]
        best = min(runs, key=lambda r: r["load_s"])
        best["peak"] = max(r["peak"] for r in runs)
        results[label] = best
        held = best["weight_bytes"] or file_bytes
        bound = (held + kv_bytes) * 1.15
        print(f"{label:28s} load {best['load_s']:6.2f} s   resident {best['rss'] / 1e9:5.2f} GB "
              f"(peak {best['peak'] / 1e9:5.2f} GB)   weights held {held / 1e9:5.2f} GB   "
              f"resident / (weights + KV) {best['rss'] / (held + kv_bytes):4.2f} (bound 1.15: "
              f"{'met' if best['rss'] <= bound else 'NOT met'})")
    reference = results.get("llama.cpp, GGUF, mmap")
    if reference:
        for label, r in results.items():
            if label.startswith("opencamp"):
                print(f"{label}: load {r['load_s'] / reference['load_s']:.2f}x llama.cpp (mmap)'s time, "
                      f"resident {r['rss'] / max(reference['rss'], 1):.2f}x its resident memory")


if __name__ == "__main__":
    main()
