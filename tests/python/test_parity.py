"""opencamp against HF transformers on the committed tiny random models (one per architecture).

The references were computed by tests/fixtures/make_tiny_models.py with transformers (f32
weights, computed in f64 and rounded to f32).
"""
import numpy as np
import pytest
from safetensors.numpy import load_file

import opencamp
from conftest import FIXTURES, TINY_MODELS

F32_TOLERANCE = 1e-4  # max |difference| of logits of order 1
# bf16 weights against the f32 reference: rounding every weight to 8 mantissa bits moves these
# tiny models' logits by up to ~0.13 (measured with transformers itself); 0.25 leaves margin.
BF16_VS_F32_TOLERANCE = 0.25
# Backends whose bf16 matmuls also round activations to bf16 (AVX512_BF16 dot products, as
# llama.cpp and PyTorch do): measured up to 0.10 against transformers' bf16-weight logits and
# 0.19 against the f32 model.
BF16_ACTIVATIONS_TOLERANCE = 0.2
BF16_ACTIVATIONS_VS_F32_TOLERANCE = 0.3

# Every backend this machine can run: the parity holds for each instruction set.
BACKENDS = [b["name"] for b in opencamp.backends() if b["usable"]]


def reference(name):
    return load_file(str(FIXTURES / name / "reference.safetensors"))


@pytest.fixture(scope="module", params=[(m, b) for b in BACKENDS for m in TINY_MODELS],
                ids=lambda p: f"{p[0]}-{p[1]}")
def tiny(request):
    name, backend = request.param
    llm = opencamp.LLM(FIXTURES / name, backend=backend, dtype="f32", threads=2)
    assert llm.backend == backend
    return name, llm, reference(name)


def test_f32_logits_match_transformers_at_every_position(tiny):
    _, llm, ref = tiny
    logits = llm.logits(ref["input_ids"].tolist())
    assert logits.shape == ref["logits"].shape
    assert np.abs(logits - ref["logits"]).max() < F32_TOLERANCE


def test_greedy_decode_matches_transformers(tiny):
    _, llm, ref = tiny
    completion = llm.complete(ref["greedy_prompt"].tolist(), max_tokens=16, ignore_eos=True)
    assert completion.token_ids == ref["greedy_tokens"].tolist()
    assert completion.finish_reason == "length"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", TINY_MODELS)
def test_bf16_weights_stay_within_tolerance(name, backend):
    ref = reference(name)
    # The weights are what is compared, with transformers' f32 KV cache (auto would be bf16).
    llm = opencamp.LLM(FIXTURES / name, backend=backend, dtype="bf16", threads=2, kv_cache_dtype="f32")
    assert llm.dtype == "bf16"
    logits = llm.logits(ref["input_ids"].tolist())
    if llm.engine.matmul_activation_dtype == "f32":
        # Same rounding of the weights as transformers' .to(bfloat16): f32-tight agreement.
        assert np.abs(logits - ref["logits_bf16_weights"]).max() < F32_TOLERANCE
        assert np.abs(logits - ref["logits"]).max() < BF16_VS_F32_TOLERANCE
    else:
        assert np.abs(logits - ref["logits_bf16_weights"]).max() < BF16_ACTIVATIONS_TOLERANCE
        assert np.abs(logits - ref["logits"]).max() < BF16_ACTIVATIONS_VS_F32_TOLERANCE
    # Greedy decoding still follows transformers token for token.
    completion = llm.complete(ref["greedy_prompt"].tolist(), max_tokens=16, ignore_eos=True)
    assert completion.token_ids == ref["greedy_tokens"].tolist()


def test_decode_path_agrees_with_prefill(tiny):
    """Feeding the tokens one at a time through decode gives the prefill's logits."""
    _, llm, ref = tiny
    ids = ref["input_ids"].tolist()
    engine = llm.engine
    seq = engine.create_sequence()
    try:
        rows = [engine.prefill(seq, ids[:1])]
        rows += [engine.decode([seq], [t])[0] for t in ids[1:]]
    finally:
        engine.free_sequence(seq)
    assert np.abs(np.stack(rows) - ref["logits"]).max() < F32_TOLERANCE


def test_repetition_penalty_matches_transformers_prompt_included(tiny):
    """transformers' repetition penalty counts the prompt's tokens too; on this prompt neither
    a penalty blind to the prompt nor none at all gives these tokens (the fixture script
    checks), so the whole path from the Python option to the sampler is exercised."""
    _, llm, ref = tiny
    penalty = float(ref["repetition_penalty"][0])
    completion = llm.complete(ref["penalty_prompt"].tolist(), max_tokens=16, ignore_eos=True,
                              repetition_penalty=penalty)
    assert completion.token_ids == ref["penalty_tokens"].tolist()
    plain = llm.complete(ref["penalty_prompt"].tolist(), max_tokens=16, ignore_eos=True)
    assert plain.token_ids != ref["penalty_tokens"].tolist()
