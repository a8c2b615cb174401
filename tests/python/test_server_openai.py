"""The official `openai` client against a live `opencamp serve` (a real child process on
127.0.0.1) running the real SmolLM2-135M-Instruct."""
from __future__ import annotations

import threading

import httpx
import openai
import pytest

from conftest import SMOLLM2_QUESTION
from serverkit import ServeProcess, count, metric, wait_until

KEY = "test-key-123"
NAME = "smollm2"
QUESTION = [{"role": "user", "content": SMOLLM2_QUESTION}]


@pytest.fixture(scope="module")
def server(smollm2_dir):
    process = ServeProcess(["--model", str(smollm2_dir), "--threads", "2", "--max-context", "1024",
                            "--parallel", "4", "--api-key", KEY, "--served-model-name", NAME])
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
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.chat.completions.create(model=NAME, messages=QUESTION, n=2)
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
