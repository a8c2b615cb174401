"""The Python API's contract: sampling, streaming, stops, errors, threads."""
import gc
import json
import shutil
import threading

import numpy as np
import pytest

import opencamp
from conftest import FIXTURES, SMOLLM2_QUESTION
from serverkit import wait_until

QUESTION = [{"role": "user", "content": SMOLLM2_QUESTION}]


@pytest.fixture(scope="module")
def llm(smollm2_dir):
    return opencamp.LLM(smollm2_dir, threads=2, max_context=512)


def test_same_seed_same_output_different_seed_differs(llm):
    options = dict(max_tokens=12, temperature=1.0, top_k=50, ignore_eos=True)
    a = llm.complete("Once upon a time", seed=7, **options)
    b = llm.complete("Once upon a time", seed=7, **options)
    c = llm.complete("Once upon a time", seed=8, **options)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.token_ids != c.token_ids


def test_top_k_one_is_greedy_at_any_temperature(llm):
    greedy = llm.complete("The sky is", max_tokens=8, ignore_eos=True)
    sampled = llm.complete("The sky is", max_tokens=8, temperature=5.0, top_k=1, seed=3,
                           ignore_eos=True)
    assert sampled.token_ids == greedy.token_ids


def test_max_tokens_ends_with_length(llm):
    completion = llm.complete("Once upon a time", max_tokens=5, ignore_eos=True)
    assert completion.completion_tokens == 5
    assert completion.finish_reason == "length"


def test_stop_string_cuts_the_text_and_stops(llm):
    full = llm.chat(QUESTION, max_tokens=32)
    assert "Paris" in full
    stream = llm.chat(QUESTION, max_tokens=32, stop=["Paris"], stream=True)
    text = "".join(stream)
    assert text == full[: full.index("Paris")]
    assert stream.completion.finish_reason == "stop"
    assert stream.completion.completion_tokens < 8  # stopped before the answer's end


def test_stop_token_ids_stop_generation(llm):
    answer = llm.complete(llm.chat_prompt_ids(QUESTION), max_tokens=32)
    capital_id = answer.token_ids[1]  # "capital" in "The capital of France ..."
    stopped = llm.complete(llm.chat_prompt_ids(QUESTION), max_tokens=32, stop_token_ids=[capital_id])
    assert stopped.token_ids == answer.token_ids[:2]
    assert stopped.finish_reason == "stop"
    assert stopped.text == "The"  # the stop token itself is not text


def test_streamed_pieces_are_whole_utf8_characters(llm):
    # SmolLM2 answers this with emoji, each spread over three byte-level tokens.
    prompt = "Répète exactement: « Ça coûte 5 € — très cher! » 日本語 🙂🙂"
    stream = llm.generate(prompt, max_tokens=40, stream=True, ignore_eos=True)
    pieces = list(stream)
    ids = stream.completion.token_ids
    assert len(pieces) < len(ids)  # characters really spanned several tokens
    # Only the very end may hold a partial character: max_tokens cut it off there.
    for piece in pieces[:-1]:
        assert "\ufffd" not in piece
    assert "".join(pieces) == llm.tokenizer.decode(ids)


def test_logprobs_ride_with_the_pieces_and_match_the_logits(llm):
    prompt = llm.chat_prompt_ids(QUESTION)
    stream = llm.stream(prompt, max_tokens=12, logprobs=3)
    pieces = list(stream)
    completion = stream.completion
    # The pieces carry the generated tokens (the final stop token comes with no piece) and
    # their logprobs.
    assert [t for p in pieces for t in p.token_ids] == completion.token_ids[:-1]
    records = [r for p in pieces for r in p.logprobs]
    assert records == completion.logprobs
    assert [r.id for r in records] == completion.token_ids[:-1]  # <|im_end|> is no text
    logits = llm.logits(prompt + completion.token_ids[:-1]).astype(np.float64)[len(prompt) - 1:-1]
    logits -= logits.max(axis=1, keepdims=True)
    expected = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    # bf16 weights round activations to bf16, and their KV cache is bf16 (kv_cache_dtype auto):
    # a prompt computed in another pass (this one is in the prefix cache from earlier tests) can
    # differ by a rounding, up to ~1e-2 here (in f32 they agree to 1e-6: test_server_openai.py
    # checks 1e-3 on an f32 server).
    for row, record in enumerate(records):
        assert abs(record.logprob - expected[row, record.id]) < 3e-2
        assert [i for i, _ in record.top] == list(np.argsort(-expected[row], kind="stable")[:3])
        assert record.top[0] == (record.id, record.logprob)  # greedy: the most likely
    # Without logprobs nothing is computed or carried.
    plain = llm.stream(prompt, max_tokens=4)
    assert all(p.logprobs is None for p in plain)
    # The prompt's own tokens, in one pass: each given the ones before it.
    found = llm.prompt_logprobs(prompt, top=2)
    whole = llm.logits(prompt).astype(np.float64)
    whole -= whole.max(axis=1, keepdims=True)
    whole -= np.log(np.exp(whole).sum(axis=1, keepdims=True))
    assert [r.id for r in found] == prompt[1:]
    assert max(abs(r.logprob - whole[i, r.id]) for i, r in enumerate(found)) < 1e-5  # one pass
    with pytest.raises(ValueError, match="logprobs"):
        llm.stream(prompt, logprobs=21)


def test_token_bytes_are_exact_even_inside_a_character(llm):
    tokenizer = llm.tokenizer
    text = "Ça coûte 5 € 🙂 日本"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert b"".join(tokenizer.token_bytes(i) for i in ids) == text.encode("utf-8")
    assert any(tokenizer.token_bytes(i).decode("utf-8", "replace") != tokenizer.decode([i])
               or b"\xf0" in tokenizer.token_bytes(i) for i in ids)
    assert tokenizer.token_bytes(tokenizer.eos_token_id) == tokenizer.eos_token.encode()


def test_logits_match_prefill_of_engine(llm):
    ids = llm.chat_prompt_ids(QUESTION)
    logits = llm.logits(ids)
    assert logits.shape == (len(ids), llm.config["vocab_size"]) and logits.dtype == np.float32
    assert int(logits[-1].argmax()) == 504  # "The", the golden answer's first token


def test_waiting_for_a_token_releases_the_gil(llm):
    """A thread blocked in the engine, waiting for its next token, lets other Python threads run.

    No clock: the request waited on cannot get a token until this thread cancels the one
    holding the only slot, which it can do only while the waiting thread is inside next()
    without the GIL. (Were the GIL held there, next() would sit out its safety timeout.)"""
    prompt = llm.tokenizer.encode("Once upon a time")
    scheduler = opencamp._core.Scheduler(llm.engine, max_running=1, max_unread_tokens=2)
    try:
        # Never read: it pauses after two tokens and keeps the only slot.
        ahead = scheduler.submit(prompt, max_tokens=400, ignore_eos=True)
        behind = scheduler.submit(prompt, max_tokens=1, ignore_eos=True)
        wait_until(lambda: scheduler.stats()["running"] == 1 and scheduler.stats()["waiting"] == 1,
                   what="one request running, one waiting")
        entered, outcome = threading.Event(), {}

        def wait_for_token():
            entered.set()
            outcome["event"] = behind.next(timeout=120)  # the timeout only guards against a hang
            outcome["timed_out"] = behind.timed_out

        waiter = threading.Thread(target=wait_for_token)
        waiter.start()
        assert entered.wait(120)
        ahead.cancel()  # Python running on this thread while the other waits in C++
        waiter.join(180)
        assert outcome["timed_out"] is False and outcome["event"] is not None
        assert ahead.wait()["finish_reason"] == "cancelled"
    finally:
        scheduler.shutdown()


def test_leaving_a_with_block_or_dropping_a_stream_stops_it_and_frees_its_cache(llm):
    # Unread, a request pauses at the scheduler's max_unread_tokens (256), so these 400-token
    # generations cannot end by themselves: only the stream's end can stop them.
    blocks = llm.engine.cache_stats()["used_blocks"]
    with llm.generate("Once upon a time", max_tokens=400, ignore_eos=True, stream=True) as stream:
        next(stream)
    assert stream.completion.finish_reason == "cancelled"
    assert stream.completion.completion_tokens < 400
    assert llm.engine.cache_stats()["used_blocks"] == blocks

    generated = llm.scheduler.stats()["generated_tokens"]
    dropped = llm.generate("Once upon a time", max_tokens=400, ignore_eos=True, stream=True)
    next(dropped)
    wait_until(lambda: llm.scheduler.stats()["running"] == 1, what="the generation to run")
    del dropped
    gc.collect()  # CPython closes it at `del` already
    wait_until(lambda: llm.scheduler.stats()["running"] == 0, what="the dropped stream to stop")
    assert llm.engine.cache_stats()["used_blocks"] == blocks
    assert llm.scheduler.stats()["generated_tokens"] - generated < 400


def test_bad_sampling_parameters_raise_clear_errors(llm):
    with pytest.raises(opencamp.OpencampError, match="temperature") as info:
        llm.generate("hi", temperature=-1)
    assert info.value.kind == "invalid_argument"
    with pytest.raises(opencamp.OpencampError, match="top_p"):
        llm.generate("hi", top_p=0)
    with pytest.raises(opencamp.OpencampError, match="max_tokens"):
        llm.generate("hi", max_tokens=0)
    with pytest.raises(ValueError, match="stop"):
        llm.generate("hi", stop=[""])
    with pytest.raises(TypeError, match="unknown sampling option"):
        llm.generate("hi", temprature=0.5)
    # nothing leaked: the only sequences left are finished conversations kept for reuse
    assert llm.engine.cache_stats()["sequences"] == llm.scheduler.stats()["idle"]


def test_prompt_longer_than_context_is_refused(llm):
    ids = [1] * (llm.max_context + 1)
    with pytest.raises(opencamp.OpencampError, match=f"{llm.max_context + 1}.*{llm.max_context}") as info:
        llm.generate(ids)
    assert info.value.kind == "capacity_exceeded"
    assert llm.engine.cache_stats()["sequences"] == llm.scheduler.stats()["idle"]


def test_out_of_vocabulary_ids_are_refused(llm):
    with pytest.raises(opencamp.OpencampError, match="outside the vocabulary"):
        llm.logits([1, llm.config["vocab_size"]])


def test_sessions_are_independent_and_freed(llm):
    before = llm.engine.cache_stats()
    a, b = llm.session(), llm.session(system="Answer in one word.")
    a.send("Hi", max_tokens=4)
    b.send("Hi", max_tokens=4)
    assert llm.engine.cache_stats()["sequences"] == before["sequences"] + 2
    assert a.cached_tokens > 0 and b.cached_tokens > 0
    a.close()
    b.close()
    after = llm.engine.cache_stats()
    # Every block is back: unused (their full blocks stay cached for later prefix hits).
    assert (after["used_blocks"], after["sequences"]) == (before["used_blocks"], before["sequences"])
    with pytest.raises(RuntimeError, match="closed"):
        a.send("again")


def test_missing_model_folder_gives_a_clear_error(tmp_path):
    with pytest.raises(opencamp.ModelNotFoundError, match="no such"):
        opencamp.LLM(tmp_path / "nowhere")


def test_unknown_architecture_lists_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "vocab_size": 10, "hidden_size": 8,'
                                          ' "intermediate_size": 8, "num_hidden_layers": 1,'
                                          ' "num_attention_heads": 2}')
    with pytest.raises(opencamp.OpencampError, match="gpt2.*llama, qwen2, qwen3") as info:
        opencamp.LLM(tmp_path)
    assert info.value.kind == "invalid_model"


def test_unsupported_activation_and_quantised_checkpoints_are_refused(tmp_path):
    shutil.copytree(FIXTURES / "tiny-llama", tmp_path / "gelu")
    config = json.loads((tmp_path / "gelu" / "config.json").read_text())
    (tmp_path / "gelu" / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    with pytest.raises(opencamp.OpencampError, match="hidden_act 'gelu' is not supported") as info:
        opencamp.LLM(tmp_path / "gelu")
    assert info.value.kind == "unsupported"
    shutil.copytree(FIXTURES / "tiny-llama", tmp_path / "awq")
    (tmp_path / "awq" / "config.json").write_text(json.dumps(
        {**config, "quantization_config": {"quant_method": "awq", "bits": 4}}))
    with pytest.raises(opencamp.OpencampError, match="quantization_config.*'awq'.*unquantised") as info:
        opencamp.LLM(tmp_path / "awq")
    assert info.value.kind == "unsupported"


def test_truncated_weights_name_the_file(tmp_path):
    source = FIXTURES / "tiny-llama"
    for name in ("config.json", "generation_config.json"):
        (tmp_path / name).write_bytes((source / name).read_bytes())
    data = (source / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(opencamp.OpencampError, match="model.safetensors.*truncated"):
        opencamp.LLM(tmp_path)


def test_ids_only_model_runs_without_a_tokenizer():
    llm = opencamp.LLM(FIXTURES / "tiny-qwen2", threads=1)
    assert llm.complete([3, 4, 5], max_tokens=3, ignore_eos=True).completion_tokens == 3
    with pytest.raises(ValueError, match="tokenizer.json"):
        llm.generate("text")


def test_module_reports_backends_and_architectures():
    names = [b["name"] for b in opencamp.backends()]
    assert "cpu" in names
    assert {a for a, _ in opencamp.architectures()} >= {"llama", "qwen2", "qwen3"}
    assert opencamp.__version__.count(".") == 2
