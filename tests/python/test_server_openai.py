"""The official `openai` client against a live `opencamp serve` (a real child process on
127.0.0.1) running the real SmolLM2-135M-Instruct."""
from __future__ import annotations

import threading

import httpx
import numpy as np
import openai
import pytest

from conftest import SMOLLM2_QUESTION
from serverkit import ServeProcess, count, metric, wait_until

KEY = "test-key-123"
ALLOWED_ORIGIN = "http://allowed.example"
NAME = "smollm2"
QUESTION = [{"role": "user", "content": SMOLLM2_QUESTION}]


@pytest.fixture(scope="module")
def server(smollm2_dir):
    process = ServeProcess(["--model", str(smollm2_dir), "--threads", "2", "--max-context", "1024",
                            "--parallel", "4", "--api-key", KEY, "--served-model-name", NAME,
                            "--allowed-origins", ALLOWED_ORIGIN])
    try:
        url = process.wait_ready()
        yield process, url
    finally:
        code = process.stop()
        assert code == 0, process.output  # a clean shutdown, even after all the tests below


@pytest.fixture(scope="module")
def client(server):
    _, url = server
    with openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=300) as c:
        yield c


def metrics(url) -> str:
    # (a server without --api-key takes any)
    response = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200
    return response.text


def test_the_command_announced_the_model(server):
    process, url = server
    assert f"serving {NAME} on {url}" in process.output
    assert "model ready" in process.output and "backend" in process.output


def test_models_are_listed(client):
    assert [m.id for m in client.models.list().data] == [NAME]


def test_non_streamed_answer(client, server):
    _, url = server
    cached_before = metric(metrics(url), "opencamp_prompt_tokens_cached_total")
    answer = client.chat.completions.create(model=NAME, messages=QUESTION, temperature=0,
                                            max_tokens=24)
    assert answer.choices[0].message.content == "The capital of France is Paris."
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage.prompt_tokens == 37  # the reference prompt of the capital question
    assert answer.usage.completion_tokens == 8  # seven answer tokens and <|im_end|>
    # usage reports exactly the prompt tokens the engine took from its cache
    cached = answer.usage.prompt_tokens_details.cached_tokens
    assert cached == metric(metrics(url), "opencamp_prompt_tokens_cached_total") - cached_before
    # Asked again, the finished conversation is taken over: every prompt token but the last
    # (whose logits the answer needs) comes from the cache, and the answer is the same.
    again = client.chat.completions.create(model=NAME, messages=QUESTION, temperature=0,
                                           max_tokens=24)
    assert again.usage.prompt_tokens_details.cached_tokens == 37 - 1
    assert again.choices[0].message.content == answer.choices[0].message.content


def test_streamed_answer(client):
    stream = client.chat.completions.create(model=NAME, messages=QUESTION, temperature=0,
                                            max_tokens=24, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert text == "The capital of France is Paris."
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 5


def test_second_turn_reuses_the_first(client):
    messages = [{"role": "system", "content": "You answer in one short sentence."},
                {"role": "user", "content": SMOLLM2_QUESTION}]
    first = client.chat.completions.create(model=NAME, messages=messages, temperature=0,
                                           max_tokens=16)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And of Germany?"}]
    second = client.chat.completions.create(model=NAME, messages=messages, temperature=0,
                                            max_tokens=16)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens  # the whole first turn came from the cache
    assert cached < second.usage.prompt_tokens
    assert second.choices[0].message.content  # and it answered


def test_completions_endpoint(client):
    completion = client.completions.create(model=NAME, prompt="The capital of France is",
                                           max_tokens=3, temperature=0)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 3
    assert "Paris" in completion.choices[0].text


def test_errors_reach_the_client_as_openai_exceptions(client, server):
    _, url = server
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=5000)
    assert info.value.code == "context_length_exceeded" and "1024" in info.value.message
    with pytest.raises(openai.BadRequestError, match="n must be between 1 and 16"):
        client.chat.completions.create(model=NAME, messages=QUESTION, n=17)
    with openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0) as intruder:
        with pytest.raises(openai.AuthenticationError):
            intruder.chat.completions.create(model=NAME, messages=QUESTION)


def test_closing_streams_early_frees_the_server(client, server):
    _, url = server
    before = count(metrics(url), "opencamp_requests_total", endpoint="chat",
                   finish_reason="cancelled")
    # Every earlier request has ended: the blocks in use now are the finished conversations the
    # server keeps for a next turn.
    blocks_before = metric(metrics(url), "opencamp_kv_cache_blocks_used")
    # Fill every slot (--parallel 4) with generations that would run for many minutes.
    streams = []
    for i in range(4):
        stream = client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": f"Write a long story, part {i}."}],
            max_tokens=900, temperature=0.8, seed=i, stream=True)
        next(stream)  # the assistant role
        streams.append(stream)
    for stream in streams:
        next(stream)
        stream.close()
    wait_until(lambda: count(metrics(url), "opencamp_requests_total", endpoint="chat",
                             finish_reason="cancelled") == before + 4,
               timeout=120, what="the four generations to stop")
    text = metrics(url)
    assert metric(text, "opencamp_requests_running") == 0
    assert metric(text, "opencamp_requests_waiting") == 0
    # The cancelled generations gave every block back (a cancelled answer is not kept; one
    # that took over a kept conversation sharing its system prompt took that one's blocks).
    assert metric(text, "opencamp_kv_cache_blocks_used") <= blocks_before
    # Were they still running, this would queue behind an hour of generation.
    answer = client.chat.completions.create(model=NAME, messages=QUESTION, temperature=0,
                                            max_tokens=24)
    assert "Paris" in answer.choices[0].message.content


def test_four_concurrent_streams_complete(client):
    questions = ["What is the capital of France?", "What is 2 + 2?",
                 "Name a color of the sky.", "What do bees make?"]
    results: dict[int, tuple[str, str]] = {}
    errors = []

    def ask(i):
        try:
            stream = client.chat.completions.create(
                model=NAME, messages=[{"role": "user", "content": questions[i]}],
                temperature=0, max_tokens=12, stream=True)
            chunks = list(stream)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            results[i] = (text, chunks[-1].choices[0].finish_reason)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    assert sorted(results) == [0, 1, 2, 3]
    for text, finish in results.values():
        assert text and finish in ("stop", "length")
    assert "Paris" in results[0][0]


# ---- logprobs, n, tokenize, CORS (the live server above, the real SmolLM2) -----------------

@pytest.fixture(scope="module")
def f32(smollm2_dir):
    """A second server holding the weights in f32, and the same model in this process for
    reference log-probabilities (log-softmax of llm.logits, in float64; each token's bytes ->
    id to read the server's tokens back). f32 because with bf16 weights the matmuls round
    activations to bf16, so one pass over the whole text (llm.logits) and the server's prefill
    + decode steps can differ by one bf16 rounding of an activation (about 4e-3 in a
    log-probability); in f32 they agree to about 1e-6. For the same reason a seeded sampled
    answer is reproduced exactly in f32, while in bf16 a prompt whose KV blocks were computed
    in another pass (the prefix cache) may, rarely, flip a draw."""
    import opencamp

    process = ServeProcess(["--model", str(smollm2_dir), "--threads", "2", "--max-context",
                            "1024", "--parallel", "2", "--dtype", "f32",
                            "--served-model-name", NAME])
    try:
        llm = opencamp.LLM(smollm2_dir, threads=2, max_context=1024, dtype="f32")  # meanwhile
        by_bytes = {}
        for token_id in range(llm.config["vocab_size"]):
            by_bytes.setdefault(llm.tokenizer.token_bytes(token_id), token_id)
        url = process.wait_ready()
        with openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0,
                           timeout=300) as client:
            yield client, url, (llm, by_bytes)
        llm.scheduler.shutdown()
    finally:
        assert process.stop() == 0, process.output


def log_softmax(logits):
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def check_chat_logprobs(content, prompt_ids, reference, top_n, greedy):
    """Each entry's log-probability and alternatives agree with the model's logits to 1e-3."""
    llm, by_bytes = reference
    ids = [by_bytes[bytes(entry.bytes)] for entry in content]
    expected = log_softmax(llm.logits(prompt_ids + ids)[len(prompt_ids) - 1:-1])
    for row, (entry, token_id) in enumerate(zip(content, ids)):
        assert entry.token == bytes(entry.bytes).decode("utf-8", errors="replace")
        assert abs(entry.logprob - expected[row, token_id]) < 1e-3, (row, entry)
        assert len(entry.top_logprobs) == top_n
        best = np.argsort(-expected[row], kind="stable")[:top_n]
        for alternative, best_id in zip(entry.top_logprobs, best):
            assert abs(alternative.logprob - expected[row, best_id]) < 1e-3
        if greedy:  # the chosen token is the most likely one
            assert by_bytes[bytes(entry.top_logprobs[0].bytes)] == token_id
            assert entry.top_logprobs[0].logprob == entry.logprob
    return ids


def test_chat_logprobs_agree_with_the_model_logits(f32):
    client, _, reference = f32
    llm, _ = reference
    messages = QUESTION
    prompt_ids = llm.chat_prompt_ids(messages)
    answer = client.chat.completions.create(model=NAME, messages=messages, temperature=0,
                                            max_tokens=24, logprobs=True, top_logprobs=5)
    choice = answer.choices[0]
    assert choice.message.content == "The capital of France is Paris."
    content = choice.logprobs.content
    assert "".join(entry.token for entry in content) == choice.message.content  # no stop token
    check_chat_logprobs(content, prompt_ids, reference, 5, greedy=True)
    # Sampled (hot, cut by top-k): the log-probabilities are still those before temperature
    # and top-k, of the tokens drawn; streamed, they come with each chunk.
    stream = client.chat.completions.create(model=NAME, messages=messages, temperature=1.3,
                                            extra_body={"top_k": 20}, seed=3, max_tokens=16, logprobs=True,
                                            top_logprobs=2, stream=True)
    chunks = [c for c in stream if c.choices and c.choices[0].logprobs is not None]
    content = [entry for c in chunks for entry in c.choices[0].logprobs.content]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert "".join(entry.token for entry in content) == text and len(content) >= 2
    check_chat_logprobs(content, prompt_ids, reference, 2, greedy=False)


def test_completions_logprobs_0_to_5_and_echo(f32):
    client, _, (llm, by_bytes) = f32
    prompt = "The capital of France is"
    prompt_ids = llm.tokenizer.encode(prompt)
    # logprobs 0: the chosen tokens' log-probabilities (it used to answer null).
    zero = client.completions.create(model=NAME, prompt=prompt, max_tokens=4, temperature=0,
                                     logprobs=0)
    lp = zero.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 4 == zero.usage.completion_tokens
    assert "".join(lp.tokens) == zero.choices[0].text
    assert [list(top) for top in lp.top_logprobs] == [[t] for t in lp.tokens]
    ids = [by_bytes[t.encode()] for t in lp.tokens]
    expected = log_softmax(llm.logits(prompt_ids + ids)[len(prompt_ids) - 1:-1])
    for row, token_id in enumerate(ids):
        assert abs(lp.token_logprobs[row] - expected[row, token_id]) < 1e-3
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
    # logprobs 5: five alternatives (the chosen one among them: greedy picks the best).
    five = client.completions.create(model=NAME, prompt=prompt, max_tokens=4, temperature=0,
                                     logprobs=5)
    lp5 = five.choices[0].logprobs
    assert lp5.tokens == lp.tokens
    for token, logprob, top in zip(lp5.tokens, lp5.token_logprobs, lp5.top_logprobs):
        assert len(top) == 5 and max(top.values()) == top[token] == logprob
    # echo: the prompt comes first, its first token without a log-probability.
    echoed = client.completions.create(model=NAME, prompt=prompt, max_tokens=2, temperature=0,
                                       logprobs=1, echo=True)
    text, lp = echoed.choices[0].text, echoed.choices[0].logprobs
    assert text == prompt + zero.choices[0].text[:len(text) - len(prompt)]
    assert len(lp.tokens) == len(prompt_ids) + 2
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected = log_softmax(llm.logits(prompt_ids))
    for i in range(1, len(prompt_ids)):
        assert abs(lp.token_logprobs[i] - expected[i - 1, prompt_ids[i]]) < 1e-3
    assert "".join(lp.tokens) == text


def test_n_choices_are_seeded_reproducible_and_prefill_the_prompt_once(f32):
    client, url, _ = f32
    story = ("Once upon a time in a small village by the sea there lived an old fisherman who "
             "every morning rowed out past the lighthouse, counted the gulls, mended his nets "
             "and told the same three stories to anyone who would listen. ") * 2
    messages = [{"role": "user", "content": story + "What happened next? Answer briefly."}]
    before = metrics(url)
    answer = client.chat.completions.create(model=NAME, messages=messages, n=3, seed=11,
                                            temperature=1.0, max_tokens=6)
    after = metrics(url)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    texts = [c.message.content for c in answer.choices]
    assert len(set(texts)) >= 2  # each its own seed stream
    prompt = answer.usage.prompt_tokens  # counted once

    def grew(name):
        return metric(after, name) - metric(before, name)

    assert answer.usage.completion_tokens == grew("opencamp_generation_tokens_total")
    assert grew("opencamp_prompt_tokens_total") == 3 * prompt  # one per choice
    # Prefilled once: the second and third choices took the prompt's whole blocks (16 tokens
    # each) from the cache, computing at most a block's worth each.
    computed = grew("opencamp_prompt_tokens_total") - grew("opencamp_prompt_tokens_cached_total")
    assert computed <= prompt + 2 * 16, (computed, prompt)
    again = client.chat.completions.create(model=NAME, messages=messages, n=3, seed=11,
                                           temperature=1.0, max_tokens=6)
    assert [c.message.content for c in again.choices] == texts
    # Streamed: the same choices, each chunk naming its index.
    stream = client.chat.completions.create(model=NAME, messages=messages, n=3, seed=11,
                                            temperature=1.0, max_tokens=6, stream=True)
    streamed = ["", "", ""]
    for chunk in stream:
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert streamed == texts


def test_several_prompts_and_continuous_usage(client):
    prompts = ["The capital of France is", "One, two, three,"]
    answer = client.completions.create(model=NAME, prompt=prompts, n=2, max_tokens=3,
                                       temperature=0)
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    alone = [client.completions.create(model=NAME, prompt=p, max_tokens=3, temperature=0)
             .choices[0].text for p in prompts]
    assert [c.text for c in answer.choices] == [alone[0], alone[0], alone[1], alone[1]]
    assert answer.usage.completion_tokens == 12
    stream = client.chat.completions.create(
        model=NAME, messages=QUESTION, temperature=0, max_tokens=24, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True})
    chunks = list(stream)
    assert all(c.usage is not None for c in chunks)
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == 8
    assert chunks[0].system_fingerprint and chunks[0].system_fingerprint.startswith("fp_")


def test_tokenize_and_detokenize_round_trip(server, f32):
    _, url = server
    llm, _ = f32[2]
    auth = {"Authorization": f"Bearer {KEY}"}
    text = "Héllo, wörld! 12345 🙂"
    tokens = httpx.post(url + "/tokenize", json={"model": NAME, "prompt": text},
                        headers=auth).json()
    assert tokens["tokens"] == llm.tokenizer.encode(text) and tokens["count"] == len(tokens["tokens"])
    assert tokens["max_model_len"] == 1024
    back = httpx.post(url + "/detokenize", json={"tokens": tokens["tokens"]}, headers=auth).json()
    assert back == {"prompt": text}
    chat = httpx.post(url + "/tokenize", json={"messages": QUESTION}, headers=auth).json()
    assert chat["count"] == 37 and chat["tokens"] == llm.chat_prompt_ids(QUESTION)
    assert httpx.post(url + "/tokenize", json={"prompt": text}).status_code == 401


def test_cors_only_for_allowed_origins(server):
    _, url = server
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    allowed = httpx.options(url + "/v1/chat/completions",
                            headers={"Origin": ALLOWED_ORIGIN, **preflight})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "POST" in allowed.headers["access-control-allow-methods"]
    refused = httpx.options(url + "/v1/chat/completions",
                            headers={"Origin": "http://evil.example", **preflight})
    assert refused.status_code >= 400 and "access-control-allow-origin" not in refused.headers
    # The requests themselves still need the key; an allowed page's answers carry the header.
    body = {"model": NAME, "messages": QUESTION, "max_tokens": 2, "temperature": 0}
    no_key = httpx.post(url + "/v1/chat/completions", json=body, headers={"Origin": ALLOWED_ORIGIN})
    assert no_key.status_code == 401
    ok = httpx.post(url + "/v1/chat/completions", json=body,
                    headers={"Origin": ALLOWED_ORIGIN, "Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    other = httpx.post(url + "/v1/chat/completions", json=body,
                       headers={"Origin": "http://evil.example", "Authorization": f"Bearer {KEY}"})
    assert "access-control-allow-origin" not in other.headers
    # The Host check still comes first.
    assert httpx.options(url + "/v1/chat/completions",
                         headers={"Origin": ALLOWED_ORIGIN, "Host": "evil.example",
                                  **preflight}).status_code == 403
