"""Fair service (issue 9): a generation owns its sequence, kept conversations give way to any
caller that needs blocks, and a stream whose consumer does not read is paused off the batch,
then ended after the idle timeout. Event-driven: every wait is for a scheduler counter, never
for the clock.
"""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

import opencamp
from opencamp import _core
from opencamp.server.app import _engine_error
from opencamp.server.relay import RequestRelay
from serverkit import TINY_CONTEXT, make_tiny_chat_model, wait_until
from conftest import FIXTURES


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_tokenizer_dir):
    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"), smollm2_tokenizer_dir)


def ids(n: int, salt: int = 0) -> list[int]:
    return [(i * 31 + salt * 17 + 3) % 200 + 20 for i in range(n)]


# ---- the scheduler owns its sequences ------------------------------------------------------

def test_changing_a_sequence_a_stream_owns_is_refused_and_the_stream_goes_on():
    engine = _core.Engine(str(FIXTURES / "tiny-llama"), threads=2)
    scheduler = _core.Scheduler(engine, max_unread_tokens=2)  # alive while we do not read
    prompt = ids(9)
    seq = engine.create_sequence()
    handle = scheduler.submit(prompt, seq=seq, max_tokens=12, ignore_eos=True)
    first = handle.next(60)
    assert first is not None
    for call in (lambda: engine.free_sequence(seq), lambda: engine.truncate_sequence(seq, 1),
                 lambda: engine.prefill(seq, [1, 2]), lambda: engine.decode([seq], [1])):
        with pytest.raises(_core.OpencampError, match=rf"sequence {seq} is owned by a generation") as e:
            call()
        assert e.value.kind == "invalid_argument"
    with pytest.raises(_core.OpencampError, match="already held"):
        scheduler.submit(prompt, seq=seq, max_tokens=3)
    # Another stream in the same batch is untouched by the refused calls.
    other = scheduler.submit(ids(7, 1), max_tokens=12, ignore_eos=True)
    tokens = [first[0]]
    while (event := handle.next(60)) is not None:
        tokens.append(event[0])
    assert handle.wait()["finish_reason"] == "length" and len(tokens) == 12
    while other.next(60) is not None:
        pass
    assert other.wait()["finish_reason"] == "length"
    # Ended: the caller's sequence is the caller's again.
    assert engine.truncate_sequence(seq, 4) == 4
    engine.free_sequence(seq)
    scheduler.shutdown()


# ---- kept conversations give way -----------------------------------------------------------

def test_logits_after_a_long_complete_takes_the_kept_conversations_blocks():
    llm = opencamp.LLM(FIXTURES / "tiny-llama", threads=2, kv_cache_tokens=64)  # 4 blocks
    llm.complete(ids(30, 2), max_tokens=30, ignore_eos=True)  # kept: ~59 positions
    assert llm.scheduler.stats()["idle"] == 1
    got = llm.logits(ids(60, 3))  # needs every block
    assert got.shape == (60, llm.config["vocab_size"])
    fresh = opencamp.LLM(FIXTURES / "tiny-llama", threads=2, kv_cache_tokens=64)
    np.testing.assert_array_equal(got, fresh.logits(ids(60, 3)))
    assert llm.scheduler.stats()["idle"] == 0
    assert llm.engine.cache_stats()["kept_sequences"] == 0
    # Still a clear error when live sequences really hold the blocks.
    held = llm.engine.create_sequence()
    llm.engine.prefill(held, ids(60, 4))
    with pytest.raises(_core.OpencampError, match="KV cache is full"):
        llm.logits(ids(20, 5))
    llm.engine.free_sequence(held)


# ---- streams whose consumers do not read ---------------------------------------------------

async def _until(predicate, what: str):
    for _ in range(3000):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def _drain(generation) -> list:
    events = []
    while True:
        event = await generation.next_event()
        events.append(event)
        if event[0] != "text":
            return events


def test_eight_unread_streams_are_paused_and_a_normal_request_completes(tiny_dir):
    llm = opencamp.LLM(tiny_dir, threads=2, max_context=TINY_CONTEXT, kv_cache_tokens=4 * TINY_CONTEXT)
    relay = RequestRelay(llm, parallel=8, stream_buffer_tokens=8, stream_idle_timeout=0)
    options = {"temperature": 0.0, "ignore_eos": True}

    async def scenario():
        # Eight streams that fill every running slot and whose responses never take a piece.
        held = [await relay.start(ids(12, i), 400, dict(options, max_tokens=400))
                for i in range(8)]
        await _until(lambda: relay.stats()["paused"] == 8, "the 8 unread streams to pause")
        assert relay.stats()["running"] == 0
        steps = relay.stats()["steps"]
        normal = await relay.start(ids(10, 99), 16, dict(options, max_tokens=16))
        events = await _drain(normal)
        assert events[-1][0] == "done" and events[-1][1].completion_tokens == 16
        # It ran while the 8 were still unread and paused, and they did not advance.
        stats = relay.stats()
        assert stats["paused"] == 8
        assert not any(g._stream.finished for g in held)
        assert stats["generated_tokens"] == 16  # only the normal one has finished
        assert stats["steps"] > steps
        # A paused stream resumes when its consumer reads, and runs to its end.
        resumed = await _drain(held[0])
        assert resumed[-1][0] == "done" and resumed[-1][1].completion_tokens == 400
        for g in held[1:]:
            g.cancel()
        for g in held[1:]:
            await _drain(g)

    asyncio.run(scenario())
    relay.close()
    assert llm.engine.cache_stats()["used_blocks"] == 0  # every block back


def test_a_stream_nobody_reads_is_ended_after_the_idle_timeout_and_frees_its_blocks(tiny_dir):
    llm = opencamp.LLM(tiny_dir, threads=2, max_context=TINY_CONTEXT)
    relay = RequestRelay(llm, parallel=2, stream_buffer_tokens=4, stream_idle_timeout=0.1)

    async def scenario():
        unread = await relay.start(ids(12), 300, {"temperature": 0.0, "ignore_eos": True,
                                                  "max_tokens": 300})
        await _until(lambda: relay.stats()["stream_timeouts"] == 1, "the idle timeout")
        await _until(lambda: llm.engine.cache_stats()["used_blocks"] == 0, "its blocks to return")
        assert llm.engine.cache_stats()["sequences"] == 0
        events = await _drain(unread)  # what it buffered, then the error
        assert events[-1][0] == "error"
        error = events[-1][1]
        assert error.kind == "timeout" and "read nothing" in str(error)
        api = _engine_error(error)
        assert api.status == 408 and api.to_dict()["error"]["code"] == "stream_idle_timeout"
        assert sum(1 for e in events if e[0] == "text") <= 4 + 4 + 1  # buffer + handoff + one

    asyncio.run(scenario())
    relay.close()


def test_stream_options_are_checked():
    engine = _core.Engine(str(FIXTURES / "tiny-llama"), threads=2)
    with pytest.raises(_core.OpencampError, match="stream_idle_timeout_seconds"):
        _core.Scheduler(engine, stream_idle_timeout=-1.0)
    with pytest.raises(_core.OpencampError, match="max_unread_tokens"):
        _core.Scheduler(engine, max_unread_tokens=0)
