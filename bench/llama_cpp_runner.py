"""llama.cpp's side of bench/test_gguf_speed.py, run as a separate process (the Python that has
llama-cpp-python, which need not be the one that has opencamp; a crash inside llama.cpp then
fails one case, not the run).

    python llama_cpp_runner.py quantize SOURCE.gguf TARGET.gguf FTYPE     (e.g. MOSTLY_Q4_K_M)
    python llama_cpp_runner.py time FILE.gguf THREADS < {"prefill": [...], "decode_context": [...],
                                                         "decode_steps": N, "rounds": R}
    python llama_cpp_runner.py contexts FILE.gguf THREADS < {"contexts": [512, ...], "decode_steps": N,
                                                             "kv_type": "f16" | "q8_0", "prompt": [...]}

`time` prints one JSON object: the best prefill and decode seconds, and whether llama.cpp's
extra buffer types (AMX, repacked rows) were on. They are switched off on CPUs with AMX: this
llama.cpp's AMX matmul crashes there (seen with llama-cpp-python 0.3.36 on every quantised type).
"""
import ctypes
import json
import statistics
import sys
import time

import llama_cpp
import llama_cpp.llama_cpp as raw


def cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " amx_int8" in f.read()
    except OSError:
        return False


def quantize(source: str, target: str, ftype: str) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_" + ftype)
    params.allow_requantize = True
    if llama_cpp.llama_model_quantize(source.encode(), target.encode(), ctypes.byref(params)) != 0:
        sys.exit(f"llama.cpp could not quantize {source} to {ftype}")


def switch_off_extra_buffers_on_amx() -> bool:
    """llama.cpp's AMX matmul (an extra buffer type) crashes on this CPU for quantised types:
    on an AMX CPU every later model load goes without extra buffers. True when they stay on."""
    if not cpu_has_amx():
        return True
    default = raw.llama_model_default_params

    def without_extra_buffers():
        params = default()
        params.use_extra_bufts = False
        return params

    raw.llama_model_default_params = without_extra_buffers
    return False


def time_file(path: str, threads: int, spec: dict) -> dict:
    extra_buffers = switch_off_extra_buffers_on_amx()
    llm = llama_cpp.Llama(model_path=path, n_ctx=1024, n_threads=threads, n_threads_batch=threads,
                          n_batch=512, n_ubatch=512, verbose=False)
    prefill, decode = float("inf"), float("inf")
    for _ in range(spec["rounds"] + 1):  # the first round warms up
        llm.reset()
        start = time.perf_counter()
        llm.eval(spec["prefill"])
        prefill = min(prefill, time.perf_counter() - start)
        llm.reset()
        llm.eval(spec["decode_context"])
        start = time.perf_counter()
        for i in range(spec["decode_steps"]):
            llm.eval([spec["decode_context"][i % len(spec["decode_context"])]])
        decode = min(decode, time.perf_counter() - start)
    llm.close()
    return {"prefill_s": prefill, "decode_s": decode, "extra_buffers": extra_buffers}


def time_contexts(path: str, threads: int, spec: dict) -> dict:
    """Decode speed as the context grows, with the KV cache in spec["kv_type"] ("f16", "q8_0"):
    the prompt is evaluated up to each of spec["contexts"] in turn (one context, growing), and
    at each, spec["decode_steps"] single-token steps are timed (1 / the median step); the
    prefill of the first context is timed too (a fresh cache, after a warm-up)."""
    switch_off_extra_buffers_on_amx()
    kv_type = {"f16": raw.GGML_TYPE_F16, "q8_0": raw.GGML_TYPE_Q8_0}[spec["kv_type"]]
    contexts, steps, prompt = spec["contexts"], spec["decode_steps"], spec["prompt"]
    llm = llama_cpp.Llama(model_path=path, n_ctx=max(contexts) + steps * len(contexts) + 16,
                          n_threads=threads, n_threads_batch=threads, n_batch=512, n_ubatch=512,
                          flash_attn=True, type_k=kv_type, type_v=kv_type, verbose=False)
    result = {"kv_type": spec["kv_type"], "decode_tokens_per_s": {}}
    llm.eval(prompt[:64])  # warm-up (graph allocation), not timed
    llm.eval([prompt[0]])
    llm.reset()
    done = 0
    for context in contexts:
        start = time.perf_counter()
        llm.eval(prompt[done:context])
        if done == 0:
            result["prefill_tokens_per_s"] = context / (time.perf_counter() - start)
        done = context
        step_seconds = []
        for i in range(steps):
            start = time.perf_counter()
            llm.eval([prompt[i]])
            step_seconds.append(time.perf_counter() - start)
        result["decode_tokens_per_s"][str(context)] = 1.0 / statistics.median(step_seconds)
    llm.close()
    return result


if __name__ == "__main__":
    if sys.argv[1] == "quantize":
        quantize(sys.argv[2], sys.argv[3], sys.argv[4])
    elif sys.argv[1] == "time":
        print(json.dumps(time_file(sys.argv[2], int(sys.argv[3]), json.load(sys.stdin))))
    elif sys.argv[1] == "contexts":
        print(json.dumps(time_contexts(sys.argv[2], int(sys.argv[3]), json.load(sys.stdin))))
    else:
        sys.exit(f"unknown command {sys.argv[1]!r}: quantize, time or contexts")
