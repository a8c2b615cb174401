"""Mistral (the llama decoder with a sliding window on every layer) against transformers: the
committed tiny random model tests/fixtures/tiny-mistral (window 4 over 20 positions; the window
changes the logits by up to 9.7, which tests/fixtures/make_tiny_mistral.py checks), on every
backend."""
import numpy as np
import pytest
from safetensors.numpy import load_file

import opencamp
from conftest import FIXTURES

TINY = FIXTURES / "tiny-mistral"
REF = load_file(str(TINY / "reference.safetensors"))
BACKENDS = [b["name"] for b in opencamp.backends() if b["usable"]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_and_greedy_decode_match_transformers(backend):
    llm = opencamp.LLM(TINY, backend=backend, dtype="f32", threads=2)
    assert llm.engine.config["model_type"] == "mistral"
    assert llm.engine.config["layer_windows"] == [4, 4]
    logits = llm.logits(REF["input_ids"].tolist())
    assert np.abs(logits - REF["logits"]).max() < 1e-4
    completion = llm.complete(REF["greedy_prompt"].tolist(), max_tokens=16, ignore_eos=True)
    assert completion.token_ids == REF["greedy_tokens"].tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_weights_match_transformers_bf16(backend):
    llm = opencamp.LLM(TINY, backend=backend, dtype="bf16", threads=2, kv_cache_dtype="f32")  # weights compared
    logits = llm.logits(REF["input_ids"].tolist())
    tolerance = 1e-4 if llm.engine.matmul_activation_dtype == "f32" else 0.2
    assert np.abs(logits - REF["logits_bf16_weights"]).max() < tolerance
