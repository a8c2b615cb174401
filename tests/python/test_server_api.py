"""The OpenAI-compatible API of `opencamp serve`, through Starlette's TestClient and through
httpx against uvicorn on 127.0.0.1: every route, the exact SSE chunk sequence, every error with
its status and shape, API keys, body limits, /health while loading, /metrics, prefix reuse,
cancellation on disconnect, and many clients at once.

These run on a tiny random model with SmolLM2's tokenizer and chat template (fast on any
backend); test_server_openai.py and test_server_browser.py use the real SmolLM2.
"""
from __future__ import annotations

import json
import re
import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
import pytest
from starlette.testclient import TestClient

import opencamp
from opencamp.server import ServerOptions, create_app, protocol
from serverkit import (HELLO, assert_openai_error, JSON_TYPE, MODEL, TINY_CONTEXT, hold_streams, live_app, make_app,
                       metric, parse_sse, sse_events, wait_until)



def chat(client, max_tokens=6, **body):
    return client.post("/v1/chat/completions",
                       json={"model": MODEL, "messages": HELLO, "max_tokens": max_tokens, **body})


def no_leaks(llm, app_state):
    """Nothing running or waiting, and every engine sequence left is a finished conversation
    the scheduler keeps for reuse: nothing leaked."""
    stats = app_state.scheduler.stats()
    kept = stats["idle"] + llm.scheduler.stats()["idle"]  # the app's, and the LLM's own loop's
    return (stats["running"] == 0 and stats["waiting"] == 0
            and llm.engine.cache_stats()["sequences"] == kept)


# ---- routes --------------------------------------------------------------------------------

def test_models_lists_the_served_model(client):
    listed = client.get("/v1/models").json()
    assert listed["object"] == "list"
    assert [m["id"] for m in listed["data"]] == [MODEL]
    assert listed["data"][0]["object"] == "model"
    assert listed["data"][0]["max_model_len"] == TINY_CONTEXT
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    assert_openai_error(client.get("/v1/models/other"), 404, param="model", code="model_not_found")


def test_chat_completion_shape_and_usage(client):
    scheduler = client.app.state.opencamp.scheduler
    cached_before = scheduler.stats()["cached_tokens"]
    response = chat(client, max_tokens=5)
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert body["model"] == MODEL and isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
    usage = body["usage"]
    assert usage["completion_tokens"] == 5
    assert usage["prompt_tokens"] > 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # Exactly the prompt tokens the engine took from its cache for this request.
    assert usage["prompt_tokens_details"]["cached_tokens"] == \
        scheduler.stats()["cached_tokens"] - cached_before
    # The same request again takes over the finished conversation: all its prompt tokens but
    # the last (whose logits the answer needs) come from the cache.
    again = chat(client, max_tokens=5).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"] - 1
    assert again["choices"] == body["choices"]


def test_chat_stream_follows_openai_chunk_sequence(client):
    whole = chat(client, max_tokens=6).json()
    response = chat(client, max_tokens=6, stream=True, stream_options={"include_usage": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    first, *content, final, usage = chunks
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["id"] == first["id"] and chunk["id"].startswith("chatcmpl-")
        assert chunk["created"] == first["created"] and chunk["model"] == MODEL
        assert "usage" in chunk
    assert first["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                 "logprobs": None, "finish_reason": None}]
    assert content, "content arrives in chunks of its own"
    for chunk in content:
        [choice] = chunk["choices"]
        assert set(choice["delta"]) == {"content"} and choice["finish_reason"] is None
        assert chunk["usage"] is None
    assert final["choices"] == [{"index": 0, "delta": {}, "logprobs": None,
                                 "finish_reason": "length"}]
    assert final["usage"] is None
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == 6
    assert usage["usage"]["prompt_tokens"] == whole["usage"]["prompt_tokens"]
    assert "cached_tokens" in usage["usage"]["prompt_tokens_details"]
    # Greedy: the streamed pieces add up to the non-streamed answer.
    text = "".join(c["choices"][0]["delta"]["content"] for c in content)
    assert text == whole["choices"][0]["message"]["content"]


def test_stream_without_include_usage_has_no_usage(client):
    events = parse_sse(chat(client, max_tokens=3, stream=True).text)
    assert events[-1] == "[DONE]"
    assert all("usage" not in e for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_completions_whole_and_streamed(client):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4}
    whole = client.post("/v1/completions", json=body).json()
    assert whole["object"] == "text_completion" and whole["id"].startswith("cmpl-")
    [choice] = whole["choices"]
    assert choice["finish_reason"] == "length" and choice["text"]
    assert whole["usage"]["completion_tokens"] == 4
    events = parse_sse(client.post("/v1/completions", json={
        **body, "stream": True, "stream_options": {"include_usage": True}}).text)
    assert events[-1] == "[DONE]"
    *content, final, usage = events[:-1]
    assert all(e["object"] == "text_completion" for e in events[:-1])
    assert "".join(e["choices"][0]["text"] for e in content) == choice["text"]
    assert final["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 4
    # Token ids are a prompt too, in either nesting.
    ids = client.app.state.opencamp.llm.tokenizer.encode("Once upon a time")
    for prompt in (ids, [ids]):
        by_ids = client.post("/v1/completions", json={**body, "prompt": prompt}).json()
        assert by_ids["choices"][0]["text"] == choice["text"]


def test_logprobs_n_and_prompt_lists_in_openai_shapes(client):
    """The shapes on the tiny model (test_server_openai.py checks the values on SmolLM2)."""
    body = chat(client, max_tokens=4, logprobs=True, top_logprobs=3).json()
    assert body["system_fingerprint"].startswith("fp_")
    [choice] = body["choices"]
    content = choice["logprobs"]["content"]
    assert choice["logprobs"]["refusal"] is None and len(content) == 4
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"]
        assert [set(t) for t in entry["top_logprobs"]] == [{"token", "logprob", "bytes"}] * 3
        assert entry["top_logprobs"][0]["logprob"] == entry["logprob"] <= 0  # greedy
    assert chat(client, max_tokens=2, logprobs=False, top_logprobs=0).json()["choices"][0][
        "logprobs"] is None
    # Streamed with n=2: each chunk names its choice and carries its tokens' logprobs.
    events = parse_sse(chat(client, max_tokens=3, n=2, logprobs=True, stream=True).text)
    chunks = events[:-1]
    roles = [c["choices"][0]["index"] for c in chunks if "role" in c["choices"][0]["delta"]]
    assert roles == [0, 1]
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert [m["finish_reason"] for m in mine][-1] == "length"
        tokens = [e for m in mine if m["logprobs"] for e in m["logprobs"]["content"]]
        assert len(tokens) == 3
        assert "".join(e["token"] for e in tokens) == "".join(
            m["delta"].get("content", "") for m in mine)
    # Several prompts, n each: choices prompt-major, prompt tokens counted once per prompt.
    prompts = ["Once upon a time", "Hello"]
    whole = client.post("/v1/completions", json={"model": MODEL, "prompt": prompts, "n": 2,
                                                 "max_tokens": 2, "logprobs": 2}).json()
    assert [c["index"] for c in whole["choices"]] == [0, 1, 2, 3]
    assert whole["choices"][0]["text"] == whole["choices"][1]["text"]  # greedy
    tokenizer = client.app.state.opencamp.llm.tokenizer
    assert whole["usage"]["prompt_tokens"] == sum(len(tokenizer.encode(p)) for p in prompts)
    assert whole["usage"]["completion_tokens"] == 8
    lp = whole["choices"][2]["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert all(2 <= len(top) <= 3 for top in lp["top_logprobs"])
    # echo, streamed: the prompt first, then the answer.
    events = parse_sse(client.post("/v1/completions", json={
        "model": MODEL, "prompt": "Hello", "max_tokens": 2, "echo": True, "stream": True}).text)
    assert events[0]["choices"][0]["text"] == "Hello"


def test_tokenize_detokenize_and_page_defaults(client, tiny_llm):
    tokens = client.post("/tokenize", json={"prompt": "Hello there", "return_token_strs": True}).json()
    assert tokens["tokens"] == tiny_llm.tokenizer.encode("Hello there")
    assert tokens["token_strs"] == [tiny_llm.tokenizer.id_to_token(t) for t in tokens["tokens"]]
    assert client.post("/detokenize", json={"tokens": tokens["tokens"]}).json() == {
        "prompt": "Hello there"}
    assert_openai_error(client.post("/detokenize", json={"tokens": [10**8]}), 400,
                        param="tokens", match="vocabulary")
    assert_openai_error(client.post("/tokenize", json={"prompt": 5}), 400, param="prompt")
    # The app of these tests sets temperature 0: the page starts from the server's defaults.
    config = client.get("/config").json()
    assert config["page_defaults_source"] == "server"
    assert config["page_defaults"]["temperature"] == 0.0
    # With no sampling default anywhere, the page (not the API) starts chat-friendly.
    bare = TestClient(create_app(tiny_llm, ServerOptions(model_name=MODEL)))
    config = bare.get("/config").json()
    assert config["page_defaults_source"] == "chat"
    assert config["page_defaults"] | {"max_tokens": None} == {
        **config["defaults"], "temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}
    assert config["defaults"]["temperature"] == 1.0  # OpenAI's, for the API


def test_cors_is_off_unless_origins_are_allowed(client, tiny_llm):
    preflight = {"Origin": "http://page.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}
    refused = client.options("/v1/chat/completions", headers=preflight)
    assert refused.status_code == 405 and "access-control-allow-origin" not in refused.headers
    assert "access-control-allow-origin" not in client.post(
        "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 1},
        headers={"Origin": "http://page.example"}).headers
    # Entered, so the app's scheduler shuts down (and frees its kept conversations) at the end.
    with TestClient(make_app(tiny_llm, allowed_origins=("http://page.example",))) as opened:
        allowed = opened.options("/v1/chat/completions", headers=preflight)
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "http://page.example"
        answer = opened.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 1},
                             headers={"Origin": "http://page.example"})
        assert answer.headers["access-control-allow-origin"] == "http://page.example"


def test_stop_strings_cut_the_answer(client):
    full = chat(client, max_tokens=8).json()["choices"][0]["message"]["content"]
    stop = full.strip().split()[2]  # a word from the middle of the greedy answer
    for stream in (False, True):
        response = chat(client, max_tokens=8, stop=[stop, "never-appears"], stream=stream)
        if stream:
            events = parse_sse(response.text)
            text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[1:-2])
            finish = events[-2]["choices"][0]["finish_reason"]
        else:
            text = response.json()["choices"][0]["message"]["content"]
            finish = response.json()["choices"][0]["finish_reason"]
        assert text == full[: full.index(stop)]
        assert finish == "stop"


def test_seeded_sampling_is_reproducible(client):
    def sample(seed):
        return chat(client, max_tokens=8, temperature=1.0, seed=seed).json()[
            "choices"][0]["message"]["content"]

    assert sample(11) == sample(11)
    assert sample(11) != sample(12)
    greedy = chat(client, max_tokens=8, temperature=0).json()["choices"][0]["message"]["content"]
    assert chat(client, max_tokens=8, temperature=1.5, top_k=1, seed=3).json()[
        "choices"][0]["message"]["content"] == greedy


def test_content_parts_and_max_completion_tokens(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello "},
                                          {"type": "text", "text": "there"}]}]
    response = client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": parts, "max_completion_tokens": 3})
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 3
    assert response.json()["choices"][0]["message"]["content"] == \
        chat(client, max_tokens=3).json()["choices"][0]["message"]["content"]


def test_server_defaults_apply_when_a_request_sets_none(tiny_llm):
    with TestClient(make_app(tiny_llm, defaults={"max_tokens": 2, "temperature": 0})) as c:
        body = c.post("/v1/chat/completions", json={"messages": HELLO}).json()  # no model: ok
        assert body["usage"]["completion_tokens"] == 2
        config = c.get("/config").json()
        assert config["defaults"]["max_tokens"] == 2 and config["defaults"]["temperature"] == 0
        assert config["model"] == MODEL and config["max_context"] == TINY_CONTEXT


# ---- errors ----------------------------------------------------------------------------------

BAD_REQUESTS = [
    # (body, status, param, message pattern)
    ({"messages": HELLO, "temperature": -1}, 400, "temperature", "temperature"),
    ({"messages": HELLO, "temperature": "hot"}, 400, "temperature", "number"),
    ({"messages": HELLO, "top_p": 0}, 400, "top_p", r"top_p must be in \(0, 1\]"),
    ({"messages": HELLO, "min_p": 2}, 400, "min_p", "min_p"),
    ({"messages": HELLO, "top_k": -5}, 400, "top_k", "top_k"),
    ({"messages": HELLO, "repetition_penalty": 0}, 400, "repetition_penalty", "repetition"),
    ({"messages": HELLO, "presence_penalty": 3}, 400, "presence_penalty", "presence"),
    ({"messages": HELLO, "frequency_penalty": -3}, 400, "frequency_penalty", "frequency"),
    ({"messages": HELLO, "max_tokens": 0}, 400, "max_tokens", "max_tokens"),
    ({"messages": HELLO, "max_tokens": "ten"}, 400, "max_tokens", "integer"),
    ({"messages": HELLO, "seed": 1.5}, 400, "seed", "integer"),
    ({"messages": HELLO, "n": 17}, 400, "n", "n must be between 1 and 16"),
    ({"messages": HELLO, "n": 0}, 400, "n", "n must be"),
    ({"messages": HELLO, "n": 2, "best_of": 3}, 400, "best_of", "best_of must equal n"),
    ({"messages": HELLO, "stop": [1, 2]}, 400, "stop", "stop"),
    ({"messages": HELLO, "stream": "yes"}, 400, "stream", "true or false"),
    ({"messages": HELLO, "stream_options": {"include_usage": True}}, 400, "stream_options",
     "only allowed when stream"),
    ({"messages": HELLO, "logprobs": "yes"}, 400, "logprobs", "true or false"),
    ({"messages": HELLO, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs",
     "between 0 and 20"),
    ({"messages": HELLO, "top_logprobs": 2}, 400, "top_logprobs", "needs logprobs"),
    ({"messages": HELLO, "echo": True}, 400, "echo", "only for /v1/completions"),
    ({"messages": HELLO, "min_tokens": 4}, 400, "min_tokens", "not supported"),
    ({"messages": HELLO, "use_beam_search": True}, 400, "use_beam_search", "beam search"),
    ({"messages": HELLO, "prompt_logprobs": 1}, 400, "prompt_logprobs", "echo"),
    ({"messages": HELLO, "reasoning_effort": "high"}, 400, "reasoning_effort", "not supported"),
    ({"messages": HELLO, "stream": True, "stream_options": {"continuous_usage_stats": 1}}, 400,
     "continuous_usage_stats", "true or false"),
    ({"messages": HELLO, "tools": [{"type": "function"}]}, 400, "tools[0].function.name",
     "name must be"),
    ({"messages": HELLO, "tool_choice": "auto"}, 400, "tool_choice",
     "'tool_choice' is only allowed when 'tools' are specified"),
    ({"messages": HELLO, "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, "tool_choice",
     "one of tools"),
    ({"messages": HELLO, "response_format": {"type": "xml"}}, 400, "response_format",
     "json_object"),
    ({"messages": HELLO, "response_format": {"type": "json_schema"}}, 400, "response_format",
     "json_schema"),
    ({"messages": HELLO, "response_format": {"type": "json_object"}, "guided_regex": "a+"}, 400,
     "guided_regex", "only one output constraint"),
    ({"messages": HELLO, "guided_regex": "(("}, 400, "guided_regex", "not valid"),
    ({"messages": HELLO, "guided_json": {"type": "bogus"}}, 400, "guided_json", "not valid"),
    ({"messages": HELLO, "guided_choice": []}, 400, "guided_choice", "non-empty list"),
    ({"messages": HELLO, "guided_whitespace_pattern": " "}, 400, "guided_whitespace_pattern",
     "JSON output only"),
    ({"messages": HELLO, "structured_outputs": {"structural_tag": "x"}}, 400,
     "structured_outputs", "not supported"),
    ({"messages": HELLO, "logit_bias": {"5": 101}}, 400, "logit_bias", "between -100 and 100"),
    ({"messages": HELLO, "logit_bias": {"word": 1}}, 400, "logit_bias", "token ids"),
    ({"messages": HELLO, "logit_bias": {"99999999": 1}}, 400, "logit_bias",
     "outside the vocabulary"),
    ({"messages": HELLO, "allowed_token_ids": [10**9]}, 400, "allowed_token_ids",
     "outside the vocabulary"),
    ({"messages": HELLO, "allowed_token_ids": []}, 400, "allowed_token_ids", "at least one"),
    ({"messages": HELLO, "functions": [{"name": "f"}]}, 400, "functions", "not supported"),
    ({"messages": []}, 400, "messages", "non-empty"),
    ({"messages": "hi"}, 400, "messages", "list"),
    ({}, 400, "messages", "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role", "role"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400,
     "messages[0].content", "only text parts"),
]


@pytest.mark.parametrize("body,status,param,pattern", BAD_REQUESTS,
                         ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD_REQUESTS)])
def test_bad_parameters_are_400_in_openai_shape(client, body, status, param, pattern):
    assert_openai_error(client.post("/v1/chat/completions", json=body), status, param=param,
                 match=pattern)


@pytest.mark.parametrize("name", sorted(protocol.REFUSED_FIELDS))
def test_fields_that_would_change_the_answer_are_refused_by_name(client, name):
    assert_openai_error(chat(client, **{name: 3}), 400, param=name, code="invalid_value")


def test_off_values_of_refused_fields_are_accepted(client):
    off = {"min_tokens": 0, "use_beam_search": False, "modalities": ["text"], "suffix": "",
           "length_penalty": 1, "add_generation_prompt": True, "bad_words": []}
    assert chat(client, max_tokens=1, **off).status_code == 200
    assert chat(client, max_tokens=1, user="someone", store=False,
                metadata={"k": "v"}).status_code == 200  # nothing in the answer changes


@pytest.mark.parametrize("raw,pattern", [
    (b"{not json", "not valid JSON"),
    (b"", "empty"),
    (b"[1, 2]", "JSON object"),
    (b"\xff\xfe", "not valid JSON"),
])
def test_malformed_json_is_400(client, raw, pattern):
    response = client.post("/v1/chat/completions", content=raw, headers=JSON_TYPE)
    assert_openai_error(response, 400, match=pattern)


def test_bad_completion_prompts_are_400(client):
    assert_openai_error(client.post("/v1/completions", json={"prompt": ["a", 5]}), 400,
                 param="prompt", match="list of strings")
    assert_openai_error(client.post("/v1/completions", json={"prompt": ["a"] * 17}), 400,
                 param="prompt", match="at most 16")
    assert_openai_error(client.post("/v1/completions", json={"prompt": ["a", []]}), 400,
                 param="prompt", match="empty")
    assert_openai_error(client.post("/v1/completions", json={"prompt": ["a"] * 5, "n": 16}),
                        400, param="n", match="64 choices")
    assert_openai_error(client.post("/v1/completions", json={"prompt": "a", "logprobs": 6}),
                        400, param="logprobs", match="between 0 and 5")
    assert_openai_error(client.post("/v1/completions", json={"prompt": "a", "logprobs": True}),
                        400, param="logprobs", match="integer")
    assert_openai_error(client.post("/v1/completions", json={"prompt": 5}), 400, param="prompt")
    assert_openai_error(client.post("/v1/completions", json={"prompt": [1, 10**9]}), 400,
                 param="prompt", match="outside the vocabulary")
    assert_openai_error(client.post("/v1/completions", json={"prompt": ""}), 400, param="prompt",
                 match="empty")


def test_unknown_model_is_404(client):
    assert_openai_error(chat(client, model="gpt-4o"), 404, param="model", code="model_not_found",
                 match="gpt-4o")


def test_prompt_beyond_the_context_is_400_with_the_counts(client, tiny_llm):
    long_text = "word " * (TINY_CONTEXT + 10)
    error = assert_openai_error(client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": long_text}]}), 400, param="messages",
        code="context_length_exceeded", match=f"maximum context length is {TINY_CONTEXT}")
    prompt_tokens = len(tiny_llm.chat_prompt_ids([{"role": "user", "content": long_text}]))
    assert str(prompt_tokens) in error["message"]
    # A prompt that fits, with a max_tokens that does not: both numbers are named.
    prompt_tokens = len(tiny_llm.chat_prompt_ids(HELLO))
    error = assert_openai_error(chat(client, max_tokens=TINY_CONTEXT), 400,
                         code="context_length_exceeded")
    assert f"{prompt_tokens + TINY_CONTEXT} tokens ({prompt_tokens} in the messages, " \
           f"{TINY_CONTEXT} in the completion)" in error["message"]


def test_unknown_routes_and_methods_are_openai_errors(client):
    assert_openai_error(client.get("/v1/nothing"), 404, code="unknown_url", match="/v1/nothing")
    assert_openai_error(client.get("/v1/chat/completions"), 405, code="method_not_allowed")


def test_api_key_guards_every_api_route(tiny_llm):
    with TestClient(make_app(tiny_llm, api_key="s3cret")) as c:
        for method, path in [("post", "/v1/chat/completions"), ("post", "/v1/completions"),
                             ("get", "/v1/models"), ("get", f"/v1/models/{MODEL}"),
                             ("get", "/metrics")]:
            body = {"messages": HELLO, "prompt": "x"} if method == "post" else None
            missing = c.request(method, path, json=body)
            assert_openai_error(missing, 401, code="invalid_api_key", match="Authorization")
            assert missing.headers["www-authenticate"] == "Bearer"
            wrong = c.request(method, path, json=body, headers={"Authorization": "Bearer nope"})
            assert_openai_error(wrong, 401, code="invalid_api_key", match="Incorrect API key")
        good = {"Authorization": "Bearer s3cret"}
        ok = c.post("/v1/chat/completions", headers=good,
                    json={"messages": HELLO, "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
        assert c.get("/metrics", headers=good).status_code == 200
        # The page, its config and the health probe stay open; the page learns a key is needed.
        assert c.get("/health").status_code == 200
        assert c.get("/").status_code == 200
        assert c.get("/config").json()["auth_required"] is True


def test_request_body_size_is_limited(tiny_llm):
    with TestClient(make_app(tiny_llm, max_request_bytes=2000)) as c:
        big = {"messages": [{"role": "user", "content": "x" * 5000}], "max_tokens": 2}
        assert_openai_error(c.post("/v1/chat/completions", json=big), 413, code="request_too_large",
                     match="2000 bytes")

        # Without a Content-Length (chunked upload) the limit holds as well.
        def chunks():
            yield json.dumps(big).encode()

        assert_openai_error(c.post("/v1/chat/completions", content=chunks(), headers=JSON_TYPE), 413,
                     code="request_too_large")
        assert chat(c, max_tokens=2).status_code == 200  # and the server goes on


def test_health_is_503_while_loading_then_200(tiny_dir):
    release = threading.Event()

    def load():
        release.wait(30)
        return opencamp.LLM(tiny_dir, threads=2, max_context=512)

    app = create_app(load, ServerOptions(model_name=MODEL))
    with TestClient(app) as c:
        assert c.get("/health").status_code == 503
        assert c.get("/health").json() == {"status": "loading"}
        assert_openai_error(chat(c), 503, code="model_loading", match="loading")
        assert c.get("/config").json()["ready"] is False
        assert metric(c.get("/metrics").text, "opencamp_model_ready") == 0
        release.set()
        wait_until(lambda: c.get("/health").status_code == 200, what="the model to load")
        assert c.get("/health").json()["status"] == "ok"
        assert chat(c, max_tokens=2).status_code == 200


def test_failed_load_is_reported(tmp_path):
    errors = []
    app = create_app(lambda: opencamp.LLM(tmp_path / "missing"),
                     ServerOptions(model_name=MODEL), on_load_error=errors.append)
    with TestClient(app) as c:
        wait_until(lambda: c.get("/health").json()["status"] == "error", what="the failure")
        assert c.get("/health").status_code == 503
        assert "missing" in c.get("/health").json()["message"]
        assert_openai_error(chat(c), 503, code="model_load_failed", match="missing")
    assert len(errors) == 1 and isinstance(errors[0], opencamp.ModelNotFoundError)


def test_error_after_streaming_began_ends_the_stream_cleanly(tiny_llm, monkeypatch):
    real_feed = opencamp.llm.Stream.feed
    pieces = {}

    def failing_feed(self, *args, **kwargs):
        """The real decoding, but a stream's third piece fails (as a decoding bug or an engine
        error would)."""
        piece = real_feed(self, *args, **kwargs)
        if piece:
            pieces[id(self)] = pieces.get(id(self), 0) + 1
            if pieces[id(self)] == 3:
                raise RuntimeError("injected failure")
        return piece

    monkeypatch.setattr(opencamp.llm.Stream, "feed", failing_feed)
    with TestClient(make_app(tiny_llm)) as c:
        response = chat(c, max_tokens=50, stream=True)
        assert response.status_code == 200
        events = parse_sse(response.text)
        assert events[-1] == "[DONE]"
        assert events[0]["choices"][0]["delta"]["role"] == "assistant"
        assert [e["choices"][0]["delta"]["content"] for e in events[1:3]]  # two pieces made it
        error = events[-2]["error"]
        assert error["type"] == "server_error" and "injected failure" in error["message"]
        assert set(error) == {"message", "type", "param", "code"}
        # Not streamed, the same failure is a 500 in OpenAI's shape.
        assert_openai_error(chat(c, max_tokens=50), 500, code="internal_error", match="injected")
        monkeypatch.setattr(opencamp.llm.Stream, "feed", real_feed)
        assert chat(c, max_tokens=2).status_code == 200  # the server goes on serving
        state = c.app.state.opencamp
        assert no_leaks(tiny_llm, state)
        text = c.get("/metrics").text
        assert metric(text, "opencamp_requests_total", endpoint="chat", finish_reason="error") == 2
        assert metric(text, "opencamp_http_errors_total", status="500") == 1


def test_bad_input_never_stops_the_server(client, tiny_llm):
    garbage = [b"{", b"null", b'{"messages": null}', b'{"messages": [null]}',
               b'{"messages": [{"role": "user"}]}', b'{"max_tokens": -1, "messages": []}',
               "{\"messages\": [{\"role\": \"user\", \"content\": \"\\ud800\"}]}".encode()]
    for raw in garbage:
        response = client.post("/v1/chat/completions", content=raw, headers=JSON_TYPE)
        assert 400 <= response.status_code < 500, (raw, response.text)
    assert chat(client, max_tokens=2).status_code == 200


# ---- metrics and multi-turn reuse -----------------------------------------------------------

def test_metrics_are_prometheus_text(client):
    first = chat(client, max_tokens=4).json()["usage"]
    second = chat(client, max_tokens=3, stream=True).text
    assert second.endswith("data: [DONE]\n\n")
    assert_openai_error(chat(client, temperature=9), 400)
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.text
    sample = re.compile(r'^[a-z_:][a-z0-9_:]*(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? '
                        r'[-+0-9.e]+(Inf)?$|^[a-z_]+ (NaN)$')
    for line in text.splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or sample.match(line), line
    assert metric(text, "opencamp_generation_tokens_total") == 7
    assert metric(text, "opencamp_prompt_tokens_total") == 2 * first["prompt_tokens"]
    assert metric(text, "opencamp_requests_total", endpoint="chat", finish_reason="length") == 2
    assert metric(text, "opencamp_http_errors_total", status="400") == 1
    assert metric(text, "opencamp_requests_running") == 0
    assert metric(text, "opencamp_requests_waiting") == 0
    assert metric(text, "opencamp_time_to_first_token_seconds_count") == 2
    assert metric(text, "opencamp_time_to_first_token_seconds_bucket", le="+Inf") == 2
    assert metric(text, "opencamp_decode_tokens_per_second_count") == 2
    assert metric(text, "opencamp_kv_cache_blocks_total") > 0
    assert metric(text, "opencamp_kv_cache_bytes_per_position", kv_dtype="f32") == \
        client.app.state.opencamp.llm.engine.cache_stats()["bytes_per_position"]
    assert 0 < metric(text, "opencamp_kv_cache_usage_ratio") < 1  # a finished chat is kept
    assert "# TYPE opencamp_time_to_first_token_seconds histogram" in text
    stats = client.app.state.opencamp.llm.engine.cache_stats()  # the engine's prefix cache
    assert metric(text, "opencamp_kv_cache_prefix_hit_blocks_total") == stats["prefix_hit_blocks"]
    assert metric(text, "opencamp_kv_cache_prefix_miss_blocks_total") == \
        stats["prefix_miss_blocks"] > 0
    assert "# TYPE opencamp_kv_cache_evictions_total counter" in text
    assert 'opencamp_model_info{model="tiny-chat",backend=' in text


def test_metrics_give_the_sliding_window_pools_of_a_gemma3_server():
    """The tiny Gemma 3 (1 global layer, 5 with a window of 5): the pool metrics are the global
    layer's, what grows with the contexts; the sliding layers' pool (sized for 2 sequences and
    a pass) has its own series, and a conversation 90 positions long holds 6 global blocks but
    at most 2 of it."""
    from conftest import FIXTURES

    llm = opencamp.LLM(FIXTURES / "tiny-gemma3", threads=2, max_running=2, kv_cache_tokens=1024)
    llm.complete(list(range(3, 53)), max_tokens=41, ignore_eos=True)  # kept for its next turn
    stats = llm.engine.cache_stats()
    with TestClient(make_app(llm)) as gemma_client:
        text = gemma_client.get("/metrics").text
    assert metric(text, "opencamp_kv_cache_blocks_total") == 64
    assert metric(text, "opencamp_kv_cache_blocks_used") == stats["used_blocks"] == 6
    assert metric(text, "opencamp_kv_cache_bytes_per_position", kv_dtype="f32") == 128
    assert metric(text, "opencamp_kv_cache_window_blocks_total", window="5") == 2 * 4 + 16
    assert 0 < metric(text, "opencamp_kv_cache_window_blocks_used", window="5") == \
        stats["groups"][1]["used_blocks"] <= 2
    assert metric(text, "opencamp_kv_cache_window_bytes_per_position", window="5") == 640
    assert metric(text, "opencamp_kv_cache_bytes") == stats["bytes"] == 16 * (64 * 128 + 24 * 640)


def test_next_turn_reuses_the_conversation_cache(client, tiny_llm, tiny_dir):
    system = {"role": "system", "content": "You are a helpful assistant who answers briefly."}
    turn1 = [system, {"role": "user", "content": "Tell me about the sea."}]
    first = client.post("/v1/chat/completions", json={"messages": turn1, "max_tokens": 12}).json()
    answer = first["choices"][0]["message"]["content"]
    # Some other conversation in between must not evict ours (the pool keeps several).
    other = chat(client, max_tokens=3).json()
    turn2 = turn1 + [{"role": "assistant", "content": answer},
                     {"role": "user", "content": "And about rivers?"}]
    second = client.post("/v1/chat/completions", json={"messages": turn2, "max_tokens": 4}).json()
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= first["usage"]["prompt_tokens"]  # the whole first turn was reused
    assert cached < second["usage"]["prompt_tokens"]
    # And the answer is the one a cold cache gives: a separate engine that holds nothing.
    cold_llm = opencamp.LLM(tiny_dir, threads=2, max_context=TINY_CONTEXT)
    cold = cold_llm.complete(cold_llm.chat_prompt_ids(turn2), max_tokens=4)
    assert cold.cached_tokens == 0
    assert second["choices"][0]["message"]["content"] == cold.text
    text = client.get("/metrics").text
    assert metric(text, "opencamp_prompt_tokens_cached_total") == sum(
        r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in (first, other, second))


def test_cached_conversations_are_evicted_when_the_cache_is_needed(tmp_path, tiny_dir):
    # A cache of two contexts: long requests must evict the blocks earlier ones left cached.
    llm = opencamp.LLM(tiny_dir, threads=2, max_context=256, kv_cache_tokens=512)
    with TestClient(make_app(llm)) as c:
        for i in range(6):
            messages = [{"role": "user", "content": f"conversation {i} " + "word " * 100}]
            max_tokens = 256 - len(llm.chat_prompt_ids(messages))  # the whole context
            response = c.post("/v1/chat/completions",
                              json={"messages": messages, "max_tokens": max_tokens})
            assert response.status_code == 200, response.text
            assert response.json()["usage"]["completion_tokens"] == max_tokens
        state = c.app.state.opencamp
        # The cache holds two whole contexts: older conversations gave their blocks back.
        assert state.scheduler.stats()["idle"] <= 2
        wait_until(lambda: no_leaks(llm, state), what="every block to come back")


# ---- a live server: disconnects and crowds ----------------------------------------------------

@pytest.fixture
def live(tiny_llm):
    # A generous buffer: clients that read (at Python's pace, in this process) never fall
    # behind enough to be paused off the batch; ones that stop reading still are.
    app = make_app(tiny_llm, parallel=2, stream_buffer_tokens=512)
    with live_app(app) as url:
        yield url, app.state.opencamp


@pytest.fixture
def held_streams(tiny_llm, monkeypatch):
    """Every generation the server starts from here on is a HeldStream (after 5 pieces); the
    list of them, in the order they started."""
    return hold_streams(tiny_llm, monkeypatch, after=5)


def _read_stream(url, body, chunks_wanted=None, results=None, timeout=120):
    """Stream a chat; stop reading after `chunks_wanted` content chunks (None: read it all)."""
    with httpx.Client(timeout=timeout) as http:
        with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            lines, content = [], 0
            for line in response.iter_lines():
                lines.append(line)
                if line.startswith("data: {") and '"content":"' in line and '"role"' not in line:
                    content += 1
                    if chunks_wanted is not None and content >= chunks_wanted:
                        return lines  # leaving the block closes the connection
    events = sse_events(lines)
    if results is not None:
        results.append(events)
    return events


def _post_then_hang_up(url, body, until):
    """POST a chat over a bare socket, wait for `until()` (the server is working on it), then
    close the connection before any answer arrived."""
    address = urlsplit(url)
    payload = json.dumps(body).encode()
    with socket.create_connection((address.hostname, address.port), timeout=60) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {address.netloc}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
                     f"\r\n".encode() + payload)
        wait_until(until, what="the server to be generating the answer")


def test_client_disconnect_cancels_generation_and_frees_the_cache(live, tiny_llm, held_streams):
    url, state = live
    body = {"messages": HELLO, "stream": True, "max_tokens": 3000}
    before = state.metrics.generation_tokens.value()
    _read_stream(url, body, chunks_wanted=3)  # the server holds at 5 pieces: it is still running
    wait_until(lambda: state.metrics.requests.value(endpoint="chat", finish_reason="cancelled") == 1,
               what="the generation to be cancelled")
    wait_until(lambda: no_leaks(tiny_llm, state), what="the sequence to be freed")
    generated = state.metrics.generation_tokens.value() - before
    assert 3 <= generated < 3000  # stopped long before max_tokens
    # Not streamed: the same holds when the client hangs up while waiting for the answer.
    _post_then_hang_up(url, {"messages": HELLO, "max_tokens": 3000},
                       until=lambda: len(held_streams) == 2 and held_streams[1].holding.is_set())
    wait_until(lambda: state.metrics.requests.value(endpoint="chat", finish_reason="cancelled") == 2,
               what="the second generation to be cancelled")
    wait_until(lambda: no_leaks(tiny_llm, state), what="the sequence to be freed")
    assert state.metrics.requests.value(endpoint="chat", finish_reason="length") == 0


def test_a_disconnect_ends_every_choice_of_an_n_request(live, tiny_llm, held_streams):
    url, state = live
    _read_stream(url, {"messages": HELLO, "stream": True, "max_tokens": 3000, "n": 3},
                 chunks_wanted=2)
    wait_until(lambda: state.metrics.requests.value(endpoint="chat", finish_reason="cancelled")
               == 3, what="the three choices to be cancelled")
    wait_until(lambda: no_leaks(tiny_llm, state), what="their sequences to be freed")


def _first_content(response):
    """Read up to the first content chunk; returns the line iterator, which must stay
    referenced: a dropped iterator closes the response (a disconnect)."""
    lines = response.iter_lines()
    for line in lines:
        if '"content":"' in line and '"role"' not in line:
            return lines


class _KeepReading:
    """A client reading its stream as fast as it comes, on a thread, until close(): its
    generation is never paused for it, so it holds its place in the batch (a client that stops
    reading would be paused off the batch and give its slot away) until max_tokens."""

    def __init__(self, url, body):
        self._client = httpx.Client(timeout=60)
        self._response = self._client.send(
            self._client.build_request("POST", url + "/v1/chat/completions", json=body), stream=True)
        self.first = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        assert self.first.wait(60), "no first chunk"

    def _read(self):
        try:
            for line in self._response.iter_lines():
                if '"content":"' in line:
                    self.first.set()
        except httpx.HTTPError:
            pass  # closed by close()

    def close(self):
        self._response.close()
        self._client.close()
        self._thread.join(60)


# The longest answer the tiny model's context allows: the reading clients' generations last
# thousands of steps, far longer than the checks made while they run.
LONGEST = TINY_CONTEXT - 40


def test_queued_client_that_leaves_gives_up_its_place(live, tiny_llm):
    url, state = live
    long_body = {"messages": HELLO, "stream": True, "max_tokens": LONGEST}
    post = "POST", url + "/v1/chat/completions"
    # Both slots (parallel=2) busy with generations whose clients read: a third request has to
    # wait.
    tokens_before = state.metrics.generation_tokens.value()
    with httpx.Client(timeout=60) as c:
        readers = [_KeepReading(url, long_body), _KeepReading(url, long_body)]
        try:
            with c.stream(*post, json={**long_body, "max_tokens": 4}) as queued:
                assert queued.status_code == 200
                wait_until(lambda: state.scheduler.waiting == 1, what="a queued request")
            # Leaving that block hung up on the queued request: it leaves the queue.
            wait_until(lambda: state.scheduler.waiting == 0, what="the queue to empty")
            assert state.scheduler.running == 2
            # It left before generating anything: it ends as cancelled, with no tokens.
            wait_until(lambda: state.metrics.requests.value(endpoint="chat",
                                                            finish_reason="cancelled") == 1,
                       what="the queued request to end as cancelled")
            # Nothing generated for it (the readers' tokens are counted when they end).
            assert state.metrics.generation_tokens.value() == tokens_before
        finally:
            for reader in readers:
                reader.close()
    wait_until(lambda: no_leaks(tiny_llm, state), what="everything to be freed")
    # All three ended (their metrics land on the event loop after the engine ends them).
    wait_until(lambda: state.metrics.requests.value(endpoint="chat", finish_reason="cancelled")
               + state.metrics.requests.value(endpoint="chat", finish_reason="length") == 3,
               what="the two reading clients' generations to end")
    assert chat_live(url, max_tokens=2)["usage"]["completion_tokens"] == 2


def chat_live(url, **body):
    response = httpx.post(url + "/v1/chat/completions",
                          json={"messages": HELLO, **body}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_many_clients_at_once_are_queued_and_all_served(live, tiny_llm):
    url, state = live
    n = 12
    results, errors = [], []
    peak_waiting = [0]
    start = threading.Barrier(n + 1)

    def client(i):
        start.wait()
        try:
            body = {"messages": [{"role": "user", "content": f"Question number {i}"}],
                    "stream": True, "max_tokens": 40, "stream_options": {"include_usage": True}}
            results.append((i, _read_stream(url, body)))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append((i, repr(e)))

    def bad_client():
        start.wait()
        for raw in (b"{", b'{"messages": []}', b'{"messages": "x", "n": 3}'):
            status = httpx.post(url + "/v1/chat/completions", content=raw, headers=JSON_TYPE,
                                timeout=60).status_code
            if status != 400:
                errors.append(("bad client", status))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n - 1)]
    threads.append(threading.Thread(target=bad_client))
    for t in threads:
        t.start()
    start.wait()
    while any(t.is_alive() for t in threads):
        peak_waiting[0] = max(peak_waiting[0], state.scheduler.waiting)
        assert state.scheduler.running <= 2
        time.sleep(0.005)
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == n - 1
    for i, events in results:
        assert events[-1] == "[DONE]"
        assert events[-2]["usage"]["completion_tokens"] == 40
        assert events[-3]["choices"][0]["finish_reason"] == "length"
    assert peak_waiting[0] > 0  # the crowd really queued
    assert no_leaks(tiny_llm, state)
    assert state.metrics.requests.value(endpoint="chat", finish_reason="length") == n - 1


def test_the_page_and_its_assets_are_served_from_the_package(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<textarea id="prompt"' in page.text
    for asset, kind in [("app.js", "javascript"), ("markdown.js", "javascript"),
                        ("style.css", "text/css")]:
        response = client.get(f"/static/{asset}")
        assert response.status_code == 200 and kind in response.headers["content-type"]
        assert f"/static/{asset}" in page.text
    assert "https://" not in page.text  # nothing from a CDN


def test_a_full_queue_answers_429(tiny_llm):
    app = make_app(tiny_llm, parallel=1, max_waiting=1, stream_buffer_tokens=512)
    state = app.state.opencamp
    long_body = {"messages": HELLO, "stream": True, "max_tokens": LONGEST}
    post = "POST"
    with live_app(app) as url, httpx.Client(timeout=60) as b:
        running = _KeepReading(url, long_body)  # the one slot, held by a client that reads
        try:
            with b.stream(post, url + "/v1/chat/completions", json=long_body) as queued:
                wait_until(lambda: state.scheduler.waiting == 1, what="a queued request")
                for stream in (False, True):
                    refused = httpx.post(url + "/v1/chat/completions", timeout=60,
                                         json={**long_body, "stream": stream, "max_tokens": 2})
                    assert_openai_error(refused, 429, code="server_busy", match="busy")
                del queued
        finally:
            running.close()
        wait_until(lambda: no_leaks(tiny_llm, state), what="everything to be freed")
        assert chat_live(url, max_tokens=2)["usage"]["completion_tokens"] == 2


# ---- the two LLM hooks the server is built on ------------------------------------------------

def test_stream_on_a_caller_owned_sequence_keeps_and_reuses_it(tiny_llm):
    prompt = tiny_llm.chat_prompt_ids(HELLO)
    seq = tiny_llm.engine.create_sequence()
    try:
        first = tiny_llm.stream(prompt, sequence=seq, max_tokens=4)
        first.text()
        held = tiny_llm.engine.sequence_tokens(seq)
        assert held == prompt + first.completion.token_ids[:-1]  # kept after the stream ended
        second = tiny_llm.stream(prompt, sequence=seq, max_tokens=4)
        second.text()
        assert second.completion.cached_tokens == len(prompt) - 1  # all but the last token
        assert second.completion.token_ids == first.completion.token_ids
    finally:
        tiny_llm.engine.free_sequence(seq)
    assert tiny_llm.engine.cache_stats()["sequences"] == tiny_llm.scheduler.stats()["idle"]


def test_stream_cancel_from_another_thread_ends_the_iteration(tiny_llm):
    stream = tiny_llm.stream(tiny_llm.chat_prompt_ids(HELLO), max_tokens=3000)
    pieces = []
    for piece in stream:
        pieces.append(piece)
        if len(pieces) == 2:
            threading.Thread(target=stream.cancel).start()
    assert stream.completion.finish_reason == "cancelled"
    assert 2 <= stream.completion.completion_tokens < 3000
    # its own sequence was freed (a cancelled answer is not kept for reuse)
    assert tiny_llm.engine.cache_stats()["sequences"] == tiny_llm.scheduler.stats()["idle"]


def test_a_hundred_random_clients_with_disconnects_leave_nothing_behind(tiny_llm):
    """Streams and plain requests of random lengths, a third of them hanging up early: every
    one that stays gets a whole answer, and afterwards nothing runs, waits or leaks."""
    import random

    app = make_app(tiny_llm, parallel=4)
    rng = random.Random(5)
    plans = [(rng.random() < 0.6, rng.random() < 0.33, rng.randint(1, 40), rng.randint(1, 9))
             for _ in range(100)]
    outcomes: list[str] = []

    def client(url, stream, leave, max_tokens, words):
        body = {"messages": [{"role": "user", "content": "word " * words}],
                "max_tokens": max_tokens, "stream": stream, "ignore_eos": True}
        with httpx.Client(timeout=120) as http:
            if stream:
                with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
                    assert response.status_code == 200
                    content = 0
                    for line in response.iter_lines():
                        if '"content":"' in line and '"role"' not in line:
                            content += 1
                            if leave and content >= 1:
                                outcomes.append("left")
                                return  # hangs up mid-stream
                        if line == "data: [DONE]":
                            outcomes.append("whole" if content >= 1 else "empty")
                            return
            elif leave:
                try:
                    http.post(url + "/v1/chat/completions", json=body, timeout=0.05)
                except httpx.TimeoutException:
                    pass
                outcomes.append("left")
            else:
                answer = http.post(url + "/v1/chat/completions", json=body).json()
                ok = answer["usage"]["completion_tokens"] == max_tokens
                outcomes.append("whole" if ok else "short")

    with live_app(app) as url:
        threads = [threading.Thread(target=client, args=(url, *plan)) for plan in plans]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        state = app.state.opencamp
        wait_until(lambda: no_leaks(tiny_llm, state), what="every request to end and free its cache")
    assert len(outcomes) == 100
    assert outcomes.count("whole") == sum(1 for stream, leave, *_ in plans if not leave)
