"""Constrained decoding: the llguidance matcher as the engine's token constraint
(python/opencamp/grammar.py), on SmolLM2's real vocabulary, and through the scheduler on the tiny
random chat model, whose answers are noise unless a grammar holds them."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

import opencamp
from opencamp import Grammar, GrammarError, GrammarUnavailable
from opencamp.grammar import GrammarCompiler
from opencamp.tokenizer import Tokenizer

EOS = 2  # SmolLM2's <|im_end|>


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_model_dir(smollm2_tokenizer_dir)


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer.backend.to_str(), 49152, [EOS])


def feed(constraint, tokenizer, text: str) -> list[int]:
    """Accept `text`'s tokens one by one, each checked against the mask first."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    for token in ids:
        assert token in constraint.allowed(), (tokenizer.id_to_token(token), text)
        constraint.accept(token)
    return ids


def test_eos_is_forbidden_until_the_grammar_is_complete(compiler, tokenizer):
    constraint = compiler.constraint(Grammar.regex(r"(yes|no)!"))
    first = constraint.allowed()
    assert EOS not in first
    assert tokenizer.token_to_id("yes") in first and tokenizer.token_to_id("no") in first
    assert tokenizer.token_to_id("maybe") not in first
    feed(constraint, tokenizer, "yes")
    assert EOS not in constraint.allowed() and not constraint.is_accepting
    feed(constraint, tokenizer, "!")
    assert constraint.allowed() == {EOS} and constraint.is_accepting


def test_a_token_that_spans_a_grammar_boundary_is_allowed_and_advances(compiler, tokenizer):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                     "maximum": 5}},
              "required": ["n"], "additionalProperties": False}
    constraint = compiler.constraint(Grammar.json_schema(schema))
    # '{"' opens the object and the key's string; '":' closes the key and is the colon.
    ids = feed(constraint, tokenizer, '{"n')
    assert tokenizer.id_to_token(ids[0]) == '{"'
    spanning = tokenizer.token_to_id('":')
    assert spanning in constraint.allowed()
    constraint.accept(spanning)
    feed(constraint, tokenizer, " 3")
    allowed = constraint.allowed()
    assert tokenizer.token_to_id("}") in allowed and EOS not in allowed
    # The bounds hold digit by digit: after "3" no further digit can follow (35 > 5).
    assert tokenizer.token_to_id("5") not in allowed
    feed(constraint, tokenizer, "}")
    assert constraint.allowed() == {EOS}
    assert constraint.tokens[-1] == tokenizer.token_to_id("}")


def test_a_forbidden_token_is_an_error_not_a_silent_step(compiler, tokenizer):
    constraint = compiler.constraint(Grammar.choice(["red", "green"]))
    with pytest.raises(GrammarError, match="does not continue the grammar"):
        constraint.accept(tokenizer.token_to_id("blue"))


def test_the_mask_is_written_as_the_engine_reads_it(compiler, tokenizer):
    constraint = compiler.constraint(Grammar.choice(["red"]))
    words = np.zeros((49152 + 31) // 32, dtype=np.uint32)
    constraint.fill_mask(words)
    red = tokenizer.token_to_id("red")
    assert words[red // 32] >> (red % 32) & 1
    assert int(np.unpackbits(words.view(np.uint8)).sum()) == len(constraint.allowed())
    with pytest.raises(TypeError, match="uint32"):
        constraint.fill_mask(np.zeros(4, dtype=np.int64))


@pytest.mark.parametrize("grammar,pattern", [
    (Grammar.regex("(("), "regex grammar is not valid"),
    (Grammar.json_schema({"type": "bogus"}), "json_schema grammar is not valid"),
    (Grammar.lark("start: nothing_defined"), "lark grammar is not valid"),
])
def test_grammars_llguidance_cannot_compile_are_refused(compiler, grammar, pattern):
    with pytest.raises(GrammarError, match=pattern):
        compiler.constraint(grammar)


def test_without_llguidance_a_grammar_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import fails as when not installed
    with pytest.raises(GrammarUnavailable, match=r"pip install 'opencamp\[grammar\]'"):
        Grammar.json_object().to_llguidance()


# ---- through the scheduler, on the tiny random model ----------------------------------------

PERSON = {"type": "object", "additionalProperties": False,
          "required": ["name", "age", "colour", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 18, "maximum": 99},
                         "colour": {"enum": ["red", "green", "blue"]},
                         "tags": {"type": "array", "maxItems": 2,
                                  "items": {"type": "string", "maxLength": 4}}}}
HELLO = [{"role": "user", "content": "Hello there"}]


def check_person(text: str) -> None:
    person = json.loads(text)
    assert set(person) == {"name", "age", "colour", "tags"}
    assert isinstance(person["name"], str) and len(person["name"]) <= 8
    assert isinstance(person["age"], int) and 18 <= person["age"] <= 99
    assert person["colour"] in ("red", "green", "blue")
    assert len(person["tags"]) <= 2 and all(len(t) <= 4 for t in person["tags"])


def test_a_random_model_answers_in_the_schema_in_a_batch_with_free_requests(tiny_llm):
    ids = tiny_llm.chat_prompt_ids(HELLO)
    free = tiny_llm.stream(ids, max_tokens=40, temperature=0.0)
    constrained = [tiny_llm.stream(ids, grammar=Grammar.json_schema(PERSON), max_tokens=200,
                                   temperature=1.0, seed=seed) for seed in range(3)]
    for stream in constrained:
        text = stream.text()
        assert stream.completion.finish_reason == "stop"
        assert stream.completion.token_ids[-1] == EOS  # the grammar, not max_tokens, ended it
        check_person(text)
    # The free neighbour gives exactly what it gives alone.
    assert free.text() == tiny_llm.generate(ids, max_tokens=40)


def test_regex_choice_and_lark_hold_a_random_model(tiny_llm):
    ids = tiny_llm.chat_prompt_ids(HELLO)
    import re
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", tiny_llm.generate(
        ids, grammar=Grammar.regex(r"[0-9]{3}-[a-z]{2}"), max_tokens=20, temperature=1.0, seed=1))
    assert tiny_llm.generate(ids, grammar=Grammar.choice(["left", "right"]), max_tokens=10) in (
        "left", "right")
    lark = 'start: "(" num ("," num)* ")"\nnum: /[1-9]/'
    assert re.fullmatch(r"\([1-9](,[1-9])*\)", tiny_llm.generate(
        ids, grammar=Grammar.lark(lark), max_tokens=20, temperature=1.0, seed=2))


def test_logit_bias_and_allowed_token_ids(tiny_llm, tokenizer):
    ids = tiny_llm.chat_prompt_ids(HELLO)
    yes, no = tokenizer.token_to_id("yes"), tokenizer.token_to_id("no")
    only = tiny_llm.complete(ids, allowed_token_ids=[yes, no], max_tokens=6, temperature=1.0,
                             seed=4)
    assert set(only.token_ids) <= {yes, no}
    pushed = tiny_llm.complete(ids, logit_bias={yes: 100}, max_tokens=4)
    assert pushed.token_ids == [yes] * 4
    free = tiny_llm.complete(ids, max_tokens=4).token_ids
    banned = tiny_llm.complete(ids, logit_bias={free[0]: -100}, max_tokens=1).token_ids
    assert banned[0] != free[0]
    with pytest.raises(ValueError, match="between -100 and 100"):
        tiny_llm.complete(ids, logit_bias={yes: 500})
    with pytest.raises(opencamp.OpencampError, match="outside the vocabulary"):
        tiny_llm.complete(ids, allowed_token_ids=[10**8])


def test_a_pydantic_model_class_is_a_grammar(tiny_llm):
    pydantic = pytest.importorskip("pydantic")  # in the test extra

    class Point(pydantic.BaseModel):
        x: int = pydantic.Field(ge=-5, le=5)
        y: int = pydantic.Field(ge=-5, le=5)

    text = tiny_llm.chat(HELLO, grammar=Point, max_tokens=60, temperature=1.0, seed=9)
    point = Point.model_validate_json(text)
    assert -5 <= point.x <= 5


def test_the_server_answers_400_when_llguidance_is_missing(client, monkeypatch):
    from serverkit import HELLO as CHAT, assert_openai_error

    monkeypatch.setitem(sys.modules, "llguidance", None)
    body = {"messages": CHAT, "max_tokens": 4, "response_format": {"type": "json_object"}}
    assert_openai_error(client.post("/v1/chat/completions", json=body), 400,
                        param="response_format", match=r"pip install 'opencamp\[grammar\]'")
    # Requests without a grammar are served as before.
    plain = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2})
    assert plain.status_code == 200


def test_completions_and_chat_routes_take_the_constraints(client, tokenizer):
    from serverkit import HELLO as CHAT

    done = client.post("/v1/completions", json={
        "prompt": "Pick one:", "max_tokens": 8, "guided_choice": ["left", "right"]}).json()
    assert done["choices"][0]["text"] in ("left", "right")
    assert done["choices"][0]["finish_reason"] == "stop"
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    chat = client.post("/v1/chat/completions", json={
        "messages": CHAT, "max_tokens": 20, "temperature": 1.0, "seed": 5,
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "r", "schema": schema, "strict": True}}})
    assert json.loads(chat.json()["choices"][0]["message"]["content"]) in ({"ok": True},
                                                                           {"ok": False})
    yes = tokenizer.token_to_id("yes")
    biased = client.post("/v1/chat/completions", json={
        "messages": CHAT, "max_tokens": 3, "logit_bias": {str(yes): 100}}).json()
    assert biased["choices"][0]["message"]["content"] == "yes" * 3
    only = client.post("/v1/chat/completions", json={
        "messages": CHAT, "max_tokens": 3, "allowed_token_ids": [yes]}).json()
    assert only["choices"][0]["message"]["content"] == "yes" * 3


def test_each_of_n_choices_has_its_own_matcher(client):
    from serverkit import HELLO as CHAT

    answer = client.post("/v1/chat/completions", json={
        "messages": CHAT, "max_tokens": 30, "n": 3, "temperature": 1.0, "seed": 11,
        "guided_regex": r"[a-c]{2}-[0-9]{3}"}).json()
    import re
    texts = [c["message"]["content"] for c in answer["choices"]]
    assert len(texts) == 3 and all(re.fullmatch(r"[a-c]{2}-[0-9]{3}", t) for t in texts), texts
    assert all(c["finish_reason"] == "stop" for c in answer["choices"])
