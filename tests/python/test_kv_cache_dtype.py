"""kv_cache_dtype through the Python API and the CLI: what the cache holds, its memory per
position, the errors. (The KV types' numerics are checked in tests/cpp/test_kv_cache.cpp and
tests/cpp/test_backend_ops.cpp; bench/kv_precision.py reports them on real models.)"""
from pathlib import Path

import pytest
from click.testing import CliRunner

import opencamp
from opencamp.cli import main

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
GEMMA = FIXTURES / "tiny-gemma3"  # 6 layers, 1 KV head of head_dim 16, a window of 5


@pytest.mark.parametrize("kv, bytes_per_position", [("auto", 768), ("f32", 768), ("bf16", 384), ("f16", 384)])
def test_the_cache_holds_the_type_asked_for(kv, bytes_per_position):
    llm = opencamp.LLM(GEMMA, threads=2, kv_cache_dtype=kv)
    assert llm.kv_cache_dtype == ("f32" if kv == "auto" else kv)  # auto: f32 weights keep f32
    # Per position: the global layer's (what grows with a context), and the 5 sliding-window
    # layers', which keep only the last positions of each sequence.
    stats = llm.engine.cache_stats()
    global_group, local_group = stats["groups"]
    assert stats["bytes_per_position"] == global_group["bytes_per_position"] == bytes_per_position // 6 == \
        opencamp._core.kv_bytes_per_position(1, 1, 16, llm.kv_cache_dtype)
    assert local_group["bytes_per_position"] == 5 * bytes_per_position // 6
    assert stats["bytes"] == 16 * (global_group["total_blocks"] * global_group["bytes_per_position"] +
                                   local_group["total_blocks"] * local_group["bytes_per_position"])
    # Past the window, greedy: the same tokens as the f32 cache on this tiny model.
    greedy = opencamp._core.SamplingParams()
    greedy.temperature = 0.0

    def tokens(model):
        return model.scheduler.submit(list(range(3, 15)), max_tokens=8, sampling=greedy,
                                      ignore_eos=True).wait()["tokens"]

    assert tokens(llm) == tokens(opencamp.LLM(GEMMA, threads=2, kv_cache_dtype="f32"))


def test_bad_kv_cache_dtypes_are_clear_errors():
    with pytest.raises(opencamp.OpencampError, match="'int4' is not one of auto, f32, bf16, f16, q8_0"):
        opencamp.LLM(GEMMA, threads=1, kv_cache_dtype="int4")
    with pytest.raises(opencamp.OpencampError, match="q8_0 KV cache needs head_dim to be a multiple of 32"):
        opencamp.LLM(GEMMA, threads=1, kv_cache_dtype="q8_0")


def test_cli_generate_takes_kv_cache_dtype(tiny_dir):
    # The tiny chat model: 2 layers, 2 KV heads of head_dim 16 (see serverkit).
    result = CliRunner().invoke(main, ["generate", "--model", str(tiny_dir), "--threads", "1",
                                       "--kv-cache-dtype", "f16", "--max-tokens", "3", "hello"])
    assert result.exit_code == 0, result.output
    assert "KV cache f16, 256 bytes per position" in result.output
    bad = CliRunner().invoke(main, ["generate", "--model", str(tiny_dir), "--kv-cache-dtype", "q4_k", "hi"])
    assert bad.exit_code == 2 and "'q4_k' is not one of" in bad.output
