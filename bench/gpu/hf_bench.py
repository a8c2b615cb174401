"""Hugging Face transformers on the same GPU and the same weights as `opencamp bench`, for the
ratios in the README, plus the GPU's copy bandwidth (the decode limit).

    python3 bench/gpu/hf_bench.py MODEL_DIR --prompt-tokens 512 --gen-tokens 128 > hf.json

prefill: the best of `repeat` forward passes over the prompt (tokens/s). decode: a greedy
generate() of prompt + gen_tokens new tokens minus one of prompt + 1 new token, so the prefill is
not counted (tokens/s of the gen_tokens - 1 later steps, the KV cache in use as transformers
keeps it by default).
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy, counting bytes read and written."""
    source = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    torch.cuda.synchronize()
    repeats = 10
    start = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / repeats
    del source, target
    torch.cuda.empty_cache()
    return 2 * (1 << 30) / seconds / 1e9


def load(model_dir: str, dtype: torch.dtype):
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    except TypeError:  # transformers before the dtype= spelling
        model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=dtype)
    return model.to("cuda").eval()


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def bench(model_dir: str, dtype_name: str, prompt_tokens: int, gen_tokens: int, repeat: int) -> dict:
    dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[dtype_name]
    model = load(model_dir, dtype)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(100, model.config.vocab_size - 100, (1, prompt_tokens), generator=generator).to("cuda")
    eos = model.config.eos_token_id
    pad = eos[0] if isinstance(eos, list) else eos

    def generate(new_tokens: int):
        model.generate(ids, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       pad_token_id=pad)

    with torch.inference_mode():
        model(ids)  # warm-up (kernels, allocator)
        generate(4)
        prefill = min(timed(lambda: model(ids)) for _ in range(repeat))
        full = min(timed(lambda: generate(gen_tokens)) for _ in range(repeat))
        first = min(timed(lambda: generate(1)) for _ in range(repeat))
    del model
    torch.cuda.empty_cache()
    decode_seconds = max(full - first, 1e-9)
    return {
        "dtype": dtype_name,
        "prefill_tokens": prompt_tokens,
        "prefill_tokens_per_s": prompt_tokens / prefill,
        "decode_tokens": gen_tokens - 1,
        "decode_tokens_per_s": (gen_tokens - 1) / decode_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dtypes", default="bf16,f32")
    args = parser.parse_args()
    result = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "copy_gb_per_s": copy_bandwidth(),
        "transformers": {},
    }
    import transformers

    result["transformers_version"] = transformers.__version__
    for dtype in args.dtypes.split(","):
        result["transformers"][dtype] = bench(args.model_dir, dtype, args.prompt_tokens, args.gen_tokens, args.repeat)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
