"""GGUF models against HF transformers loading the same files (tests/fixtures/tiny-gguf, made by
tests/fixtures/make_tiny_gguf.py), on every backend: F32 and the five 32-value block formats for
tiny llama (q/k rows permuted as llama.cpp writes them), qwen2 and qwen3; the K formats (files
quantised by llama.cpp itself, formats mixed as in real Q4_K_M / Q5_K_M / Q6_K files) for a
hidden-256 llama. Then precision choices: dequantising at load, quantising safetensors at load,
and honest reports of mixed files. And the real SmolLM2 Q4_1 file answers as transformers does."""
import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from opencamp import _core
from conftest import FIXTURES, SHARED, SMOLLM2, _require_shared

TINY_GGUF = FIXTURES / "tiny-gguf"
REFERENCE = load_file(str(TINY_GGUF / "reference.safetensors"))
FILES = sorted(p.name for p in TINY_GGUF.glob("*.gguf"))
BACKENDS = [b["name"] for b in _core.backends() if b["usable"]]
# f32 activations against transformers' float32 on the same dequantised weights.
F32_TOLERANCE = 2e-4


def model_of(file_name):
    return file_name.split(".")[0]


def all_logits(engine, ids):
    seq = engine.create_sequence()
    try:
        return engine.prefill(seq, ids, all_positions=True)
    finally:
        engine.free_sequence(seq)


def tolerance(engine):
    # Backends whose quantised kernels round activations (bf16 / 8-bit) are held to the looser
    # bound their own kernel tests justify; today every backend multiplies f32 activations here.
    return F32_TOLERANCE if engine.matmul_activation_dtype == "f32" else 0.3


def test_fixture_set_is_complete():
    assert len(FILES) == 20, FILES
    kinds = {f.split(".")[1] for f in FILES}
    assert kinds == {"f32", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k_m", "q5_k_m"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("file_name", FILES)
def test_logits_match_transformers_on_the_same_file(file_name, backend):
    ids = REFERENCE[f"{model_of(file_name)}.input_ids"].tolist()
    expected = REFERENCE[f"{file_name[:-len('.gguf')]}.logits"]
    # The weights are what is compared, with transformers' f32 KV cache (auto: f16 for these).
    engine = _core.Engine(str(TINY_GGUF / file_name), backend=backend, dtype="auto", threads=2,
                          kv_cache_dtype="f32")
    logits = all_logits(engine, ids)
    assert logits.shape == expected.shape
    assert np.abs(logits - expected).max() < tolerance(engine), file_name


def test_file_formats_are_kept_and_reported():
    engine = _core.Engine(str(TINY_GGUF / "tiny-llama.q4_1.gguf"), backend="cpu")
    assert engine.dtype == "q4_1"
    assert set(engine.weight_types) == {"q4_1"}
    # llama.cpp's Q4_K_M: Q4_K, with Q6_K where it spends more bits, and 32-value formats for
    # rows no K format fits (64 / 32 values here).
    engine = _core.Engine(str(TINY_GGUF / "tiny-llama-256.q4_k_m.gguf"), backend="cpu")
    types = engine.weight_types
    assert "q4_k" in types and "q6_k" in types and len(types) >= 3, types
    assert engine.dtype.startswith(max(types, key=lambda t: types[t][1]) + " (mixed: ")
    for name, (count, _) in types.items():
        assert f"{count} {name}" in engine.dtype
    assert sum(count for count, _ in types.values()) == 9  # embedding, output, 7 layer matrices


@pytest.mark.parametrize("file_name", ["tiny-llama.q4_0.gguf", "tiny-qwen3.q5_1.gguf",
                                       "tiny-llama-256.q5_k_m.gguf"])
def test_dequantising_at_load_computes_the_same(file_name):
    """dtype=f32 turns every block into its exact values: the same logits as running the blocks."""
    ids = REFERENCE[f"{model_of(file_name)}.input_ids"].tolist()
    kept = all_logits(_core.Engine(str(TINY_GGUF / file_name), backend="cpu", kv_cache_dtype="f32"), ids)
    f32 = _core.Engine(str(TINY_GGUF / file_name), backend="cpu", dtype="f32", kv_cache_dtype="f32")
    assert f32.dtype == "f32"
    assert np.abs(all_logits(f32, ids) - kept).max() < 1e-5
    bf16 = _core.Engine(str(TINY_GGUF / file_name), backend="cpu", dtype="bf16", kv_cache_dtype="f32")
    assert bf16.dtype == "bf16"
    assert np.abs(all_logits(bf16, ids) - kept).max() < 0.25


def test_quantising_safetensors_at_load():
    """dtype=q8_0 on a Hugging Face folder: every matrix in Q8_0, logits near the f32 model's
    (measured 0.12; that they are exactly those of the quantised weights is checked by
    test_gguf_models.cpp); q4_k on rows of 32 / 64 values falls back to Q5_0 as llama.cpp does."""
    folder = FIXTURES / "tiny-llama"
    ref = load_file(str(folder / "reference.safetensors"))
    ids = ref["input_ids"].tolist()
    q8 = _core.Engine(str(folder), backend="cpu", dtype="q8_0")
    assert q8.dtype == "q8_0" and set(q8.weight_types) == {"q8_0"}
    assert np.abs(all_logits(q8, ids) - ref["logits"]).max() < 0.25
    q4k = _core.Engine(str(folder), backend="cpu", dtype="q4_k")
    assert q4k.dtype == "q5_0" and set(q4k.weight_types) == {"q5_0"}
    with pytest.raises(_core.OpencampError, match="dtype 'q3_k' is not supported.*q4_k") as info:
        _core.Engine(str(folder), backend="cpu", dtype="q3_k")
    assert info.value.kind == "invalid_argument"


def test_folder_with_one_gguf_and_with_several(tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    (one / "model.gguf").write_bytes((TINY_GGUF / "tiny-qwen2.q8_0.gguf").read_bytes())
    engine = _core.Engine(str(one), backend="cpu")
    assert engine.config["model_type"] == "qwen2" and engine.dtype == "q8_0"
    with pytest.raises(_core.OpencampError, match="20 GGUF files.*tiny-llama-256.q4_k_m.gguf") as info:
        _core.Engine(str(TINY_GGUF), backend="cpu")
    assert info.value.kind == "invalid_model"


SMOLLM2_REFERENCE = json.loads((FIXTURES / "smollm2-q4_1-gguf-reference.json").read_text())


def greedy(engine, prompt, n):
    seq = engine.create_sequence()
    try:
        out = [int(np.argmax(engine.prefill(seq, prompt)))]
        while len(out) < n:
            out.append(int(np.argmax(engine.decode([seq], [out[-1]])[0])))
        return out
    finally:
        engine.free_sequence(seq)


@pytest.mark.parametrize("backend", BACKENDS)
def test_smollm2_q4_1_gguf_answers_as_transformers_does(backend):
    """The shared Q4_1 file, loaded as it is, gives the ids transformers computes on that file in
    float32 (tests/fixtures/make_smollm2_gguf_reference.py). The cpu oracle is slow on a real
    model: it checks the first 3 tokens, the others the whole answer."""
    path = _require_shared(SHARED / f"{SMOLLM2}.Q4_1.gguf")
    engine = _core.Engine(str(path), backend=backend, threads=2, kv_cache_dtype="f32")  # the f32 reference's
    config = engine.config
    assert (config["model_type"], config["num_layers"], config["hidden_size"]) == ("llama", 30, 576)
    assert (config["num_heads"], config["num_kv_heads"], config["vocab_size"]) == (9, 3, 49152)
    assert config["tie_word_embeddings"] and config["eos_token_ids"] == [2] and config["bos_token_id"] == 1
    assert config["rope_theta"] == 100000.0 and config["max_position_embeddings"] == 8192
    assert engine.dtype == "q4_1 (mixed: 210 q4_1, 1 q8_0)"
    answer = SMOLLM2_REFERENCE["answer_ids"]
    n = 3 if backend == "cpu" else len(answer)
    assert greedy(engine, SMOLLM2_REFERENCE["prompt_ids"], n) == answer[:n]
