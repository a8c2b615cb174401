"""Many streamed clients at once through `opencamp serve`'s relay (one dispatcher carrying every
request's tokens per scheduler step): each client gets exactly what it would get alone."""
from __future__ import annotations

import threading

import httpx

from serverkit import live_app, make_app, sse_events

STREAMS = 16
TOKENS = 40


def _streamed_completion(url: str, prompt: str) -> dict:
    body = {"model": "tiny-chat", "prompt": prompt, "max_tokens": TOKENS, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    with httpx.Client(timeout=120) as http:
        with http.stream("POST", url + "/v1/completions", json=body) as response:
            assert response.status_code == 200
            events = sse_events(response.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    usage = chunks[-1]["usage"]
    pieces = [c["choices"][0]["text"] for c in chunks[:-1] if c["choices"][0]["text"]]
    finish = [c["choices"][0]["finish_reason"] for c in chunks[:-1]]
    # Exact chunk sequence: text chunks, then one with the finish reason, then the usage.
    assert finish[-1] == "length" and not any(finish[:-1])
    return {"text": "".join(pieces), "pieces": pieces, "tokens": usage["completion_tokens"]}


def test_sixteen_concurrent_streams_each_get_what_they_would_alone(tiny_llm):
    prompts = [f"Client {i} asks:" + " more" * i for i in range(STREAMS)]
    app = make_app(tiny_llm, parallel=STREAMS)
    state = app.state.opencamp
    with live_app(app) as url:
        alone = [_streamed_completion(url, p) for p in prompts]
        steps_before = state.scheduler.stats()["steps"]
        together: list = [None] * STREAMS
        start = threading.Barrier(STREAMS)

        def client(i: int) -> None:
            start.wait()
            together[i] = _streamed_completion(url, prompts[i])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(STREAMS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        steps = state.scheduler.stats()["steps"] - steps_before
    for i in range(STREAMS):
        assert together[i] is not None, f"client {i} got no answer"
        assert together[i]["tokens"] == alone[i]["tokens"] == TOKENS
        assert together[i]["text"] == alone[i]["text"], f"client {i} got another text together"
        # The same greedy tokens as the Python API gives for the prompt alone.
        assert alone[i]["text"] == tiny_llm.complete(prompts[i], max_tokens=TOKENS, ignore_eos=True,
                                                     temperature=0.0).text
    # They really ran together: far fewer steps than one per token of each.
    assert steps < STREAMS * TOKENS / 2
    assert state.scheduler.generations() == []
