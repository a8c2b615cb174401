"""The real SmolLM2-135M-Instruct: the golden answer from ../shared/models/README.md, reproduced
exactly through llm.chat and through a session; multi-turn KV reuse."""
import numpy as np
import pytest

import opencamp
from conftest import SMOLLM2_ANSWER_IDS, SMOLLM2_ANSWER_TEXT, SMOLLM2_PROMPT_IDS, SMOLLM2_QUESTION

QUESTION = [{"role": "user", "content": SMOLLM2_QUESTION}]
ANSWER_TEXT = SMOLLM2_ANSWER_TEXT.removesuffix("<|im_end|>")  # the stop token is not text


@pytest.fixture(scope="module")
def llm(smollm2_dir):
    return opencamp.LLM(smollm2_dir, threads=2)


def test_loads_with_checkpoint_precision(llm):
    assert llm.dtype == "bf16"  # "auto" keeps the checkpoint's bf16 (test_loader: zero-copy)
    assert llm.config["model_type"] == "llama"
    assert llm.config["eos_token_ids"] == [2]


def test_chat_prompt_ids_match_reference(llm):
    assert llm.chat_prompt_ids(QUESTION) == SMOLLM2_PROMPT_IDS


def test_chat_reproduces_golden_answer(llm):
    stream = llm.chat(QUESTION, max_tokens=32, stream=True)
    pieces = list(stream)
    completion = stream.completion
    assert completion.token_ids == SMOLLM2_ANSWER_IDS
    assert completion.finish_reason == "stop"
    assert "".join(pieces) == ANSWER_TEXT == completion.text
    assert llm.tokenizer.decode(completion.token_ids) == SMOLLM2_ANSWER_TEXT
    assert len(pieces) > 1  # really streamed, piece by piece
    assert llm.chat(QUESTION, max_tokens=32) == ANSWER_TEXT


def test_session_reproduces_golden_answer(llm):
    with llm.session() as session:
        assert session.send(SMOLLM2_QUESTION, max_tokens=32) == ANSWER_TEXT
        assert session.last.token_ids == SMOLLM2_ANSWER_IDS
        # Earlier tests asked the same question: whole blocks of it may come from the prefix
        # cache, never a partial block and never the whole prompt.
        block = llm.engine.cache_stats()["block_size"]
        assert session.last.cached_tokens % block == 0
        assert session.last.cached_tokens < len(SMOLLM2_PROMPT_IDS)
        assert session.messages[-1] == {"role": "assistant", "content": ANSWER_TEXT}


def test_second_turn_prefills_only_new_tokens_and_equals_fresh_chat(llm, smollm2_dir):
    follow_up = "And of Germany?"
    with llm.session() as session:
        session.send(SMOLLM2_QUESTION, max_tokens=32)
        first = session.last
        stream = session.send(follow_up, max_tokens=24, stream=True)
        second_text = "".join(stream)
        second = stream.completion

    # The cache held the first prompt and every answer token except the last one sampled (the
    # stop token, never fed back), so exactly those are reused.
    assert second.cached_tokens == first.prompt_tokens + len(first.token_ids) - 1
    full_history = QUESTION + [{"role": "assistant", "content": first.text},
                               {"role": "user", "content": follow_up}]
    assert second.prompt_tokens == len(llm.chat_prompt_ids(full_history))
    assert second.prompt_tokens - second.cached_tokens < len(llm.chat_prompt_ids(
        [{"role": "user", "content": follow_up}]))  # fewer than even a fresh one-turn prompt

    # A separate engine: nothing cached, the whole history computed in one prefill.
    fresh_llm = opencamp.LLM(smollm2_dir, threads=2)
    fresh = fresh_llm.chat(full_history, max_tokens=24, stream=True)
    assert "".join(fresh) == second_text
    assert fresh.completion.cached_tokens == 0
    assert fresh.completion.token_ids == second.token_ids


def test_prefix_cache_reuses_a_shared_prompt_across_requests(smollm2_dir):
    """Two different questions after the same long system prompt: the second maps the system
    prompt's blocks from the cache, and answers exactly as an engine without them would."""
    system = ("You are a meticulous geography tutor. Answer every question about capitals in "
              "one short sentence, name the country again, and never add anything else. ") * 2
    first = [{"role": "system", "content": system}, {"role": "user", "content": SMOLLM2_QUESTION}]
    second = [{"role": "system", "content": system}, {"role": "user", "content": "What is the capital of Italy?"}]
    shared = opencamp.LLM(smollm2_dir, threads=2)
    shared.complete(shared.chat_prompt_ids(first), max_tokens=4)
    cached = shared.complete(shared.chat_prompt_ids(second), max_tokens=12)
    block = shared.engine.cache_stats()["block_size"]
    system_tokens = len(shared.tokenizer.encode(system))
    assert cached.cached_tokens >= (system_tokens // block) * block > 0

    alone = opencamp.LLM(smollm2_dir, threads=2).complete(shared.chat_prompt_ids(second), max_tokens=12)
    assert alone.cached_tokens == 0
    assert cached.token_ids == alone.token_ids


def test_closing_a_stream_early_stops_and_frees(llm):
    before = llm.engine.cache_stats()["used_blocks"]
    # Unread, a request pauses at the scheduler's max_unread_tokens (256): it cannot reach 600
    # tokens by itself, however fast the machine, so only close() can have ended it.
    stream = llm.generate("Once upon a time", max_tokens=600, ignore_eos=True, stream=True)
    next(stream)
    stream.close()
    assert stream.completion.finish_reason == "cancelled"
    assert stream.completion.completion_tokens < 600
    assert llm.engine.cache_stats()["used_blocks"] == before


USABLE_BACKENDS = [b["name"] for b in opencamp.backends() if b["usable"]]
# The SIMD backends (each instruction set); where there is none, the cpu oracle itself, so the
# list is never empty. The whole answer on the scalar oracle takes about a minute, too long for
# the suite when faster backends exist: those are checked against it below instead.
GOLDEN_BACKENDS = [b for b in USABLE_BACKENDS if b != "cpu"] or ["cpu"]
ORACLE_PROMPT = SMOLLM2_PROMPT_IDS[:5]


@pytest.fixture(scope="module")
def oracle_logits(smollm2_dir):
    """SmolLM2's logits on the first prompt tokens through the scalar cpu oracle (f32)."""
    oracle = opencamp.LLM(smollm2_dir, backend="cpu", dtype="f32", threads=2)
    assert oracle.backend == "cpu"
    return oracle.logits(ORACLE_PROMPT)


@pytest.mark.parametrize("dtype", ["bf16", "f32"])
@pytest.mark.parametrize("backend", GOLDEN_BACKENDS)
def test_golden_answer_on_every_backend_and_dtype(smollm2_dir, oracle_logits, backend, dtype):
    """Each instruction set this machine has, bf16 and f32 weights: the same exact answer; in
    f32, SmolLM2's real shapes (576 wide, 9 query / 3 KV heads of 64, 30 layers) give the cpu
    oracle's logits, position by position."""
    model = opencamp.LLM(smollm2_dir, backend=backend, dtype=dtype, threads=2)
    assert model.backend == backend and model.dtype == dtype
    completion = model.complete(model.chat_prompt_ids(QUESTION), max_tokens=16)
    assert completion.token_ids == SMOLLM2_ANSWER_IDS
    if dtype == "f32":
        logits = model.logits(ORACLE_PROMPT)
        assert np.abs(logits - oracle_logits).max() < 1e-3  # logits up to ~35: f32 order only
        assert (logits.argmax(axis=1) == oracle_logits.argmax(axis=1)).all()


def test_concurrent_chats_answer_exactly_as_each_alone(smollm2_dir):
    """Four different questions streamed at once share every forward pass of the scheduler,
    chunked prompts included; each answer is token for token what the question gets alone."""
    questions = ["What is the capital of France?", "What is the capital of Japan?",
                 "Name three primary colors.", "What is 12 times 12?"]
    batched = opencamp.LLM(smollm2_dir, threads=2)
    streams = [batched.chat([{"role": "user", "content": q}], max_tokens=24, stream=True)
               for q in questions]
    texts = ["" for _ in questions]
    pending = set(range(len(streams)))
    while pending:  # read them round-robin, as a server's clients would
        for i in sorted(pending):
            piece = next(streams[i], None)
            if piece is None:
                pending.discard(i)
            else:
                texts[i] += piece
    assert batched.scheduler.stats()["batch_tokens"] > batched.scheduler.stats()["steps"]
    alone = opencamp.LLM(smollm2_dir, threads=2, max_running=1)
    for question, stream in zip(questions, streams):
        expected = alone.complete(alone.chat_prompt_ids([{"role": "user", "content": question}]),
                                  max_tokens=24)
        assert stream.completion.token_ids == expected.token_ids, question
    assert "Paris" in texts[0] and "Tokyo" in texts[1]
