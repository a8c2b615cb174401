"""Tool calling's formats (python/opencamp/server/tools.py): which format a template speaks, the
grammar a forced call gets (compiled by llguidance on SmolLM2's vocabulary, and fed the answer a
model of that format writes), and calls read back out of each format's text. No model runs."""
from __future__ import annotations

import json

import pytest

from opencamp.grammar import GrammarCompiler
from opencamp.server import tools
from opencamp.tokenizer import Tokenizer

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
HERMES_TEMPLATE = "{% for t in tools %}{{ t | tojson }}{% endfor %}<tool_call>"
LLAMA3_TEMPLATE = "{% if tools %}Environment: ipython{% endif %}<|python_tag|>"


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer_dir):
    return Tokenizer.from_model_dir(smollm2_tokenizer_dir)


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(tokenizer.backend.to_str(), 49152, [2])


def accepts(compiler, tokenizer, grammar, text: str) -> bool:
    """The grammar takes `text` token by token and then allows EOS (the answer may end)."""
    constraint = compiler.constraint(grammar)
    for token in tokenizer.encode(text, add_special_tokens=False):
        if token not in constraint.allowed():
            return False
        constraint.accept(token)
    return 2 in constraint.allowed()


def test_the_format_follows_the_template():
    assert tools.tool_format(HERMES_TEMPLATE) == "hermes"
    assert tools.tool_format(LLAMA3_TEMPLATE) == "llama3_json"
    assert tools.tool_format("{{ messages }}") == "generic"
    assert tools.tool_format(None) == "generic"


def test_tool_choice_none_leaves_the_tools_out():
    assert tools.plan(HERMES_TEMPLATE, ASK, [WEATHER], "none", True) is None


def test_hermes_forced_call_grammar_and_parse(compiler, tokenizer):
    plan = tools.plan(HERMES_TEMPLATE, ASK, [WEATHER, TIME], "required", parallel=False)
    assert plan.template_tools == [WEATHER, TIME] and plan.messages == ASK
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert accepts(compiler, tokenizer, plan.grammar, call)
    assert not accepts(compiler, tokenizer, plan.grammar,
                       call.replace('"city"', '"town"'))  # the arguments' schema holds
    content, calls = tools.parse(plan, call)
    assert content is None and calls[0]["function"] == {"name": "get_weather",
                                                         "arguments": '{"city": "Paris"}'}
    # auto: free text, calls read out of it wherever they are; unknown names stay text.
    auto = tools.plan(HERMES_TEMPLATE, ASK, [WEATHER], "auto", True)
    assert auto.grammar is None
    content, calls = tools.parse(auto, "Let me look.\n" + call)
    assert content == "Let me look." and len(calls) == 1
    assert tools.parse(auto, call.replace("get_weather", "rm_rf")) == (
        call.replace("get_weather", "rm_rf"), [])


def test_named_choice_offers_only_that_function(compiler, tokenizer):
    named = {"type": "function", "function": {"name": "get_time"}}
    plan = tools.plan(HERMES_TEMPLATE, ASK, [WEATHER, TIME], named, True)
    assert plan.names == ("get_time",)
    assert accepts(compiler, tokenizer, plan.grammar,
                   '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    assert not accepts(compiler, tokenizer, plan.grammar,
                       '<tool_call>\n{"name": "get_weather", "arguments": {"city": "x"}}'
                       '\n</tool_call>')


def test_llama3_json_calls(compiler, tokenizer):
    plan = tools.plan(LLAMA3_TEMPLATE, ASK, [WEATHER], "required", True)
    call = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    assert accepts(compiler, tokenizer, plan.grammar, call)
    content, calls = tools.parse(plan, "<|python_tag|>" + call)
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert tools.parse(plan, "It is sunny.") == ("It is sunny.", [])


def test_generic_format_describes_the_tools_and_holds_the_answer_to_json(compiler, tokenizer):
    system = [{"role": "system", "content": "Be brief."}]
    plan = tools.plan("{{ messages }}", system + ASK, [WEATHER], "auto", True)
    assert plan.template_tools is None
    assert plan.messages[0]["content"].startswith("Be brief.") and "get_weather" in \
        plan.messages[0]["content"]
    reply = '{"response": "It is sunny."}'
    call = '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}'
    assert accepts(compiler, tokenizer, plan.grammar, reply)
    assert accepts(compiler, tokenizer, plan.grammar, call)
    assert tools.parse(plan, reply) == ("It is sunny.", [])
    content, calls = tools.parse(plan, call)
    assert content is None and calls[0]["function"]["name"] == "get_weather"
    required = tools.plan("{{ messages }}", ASK, [WEATHER], "required", False)
    assert not accepts(compiler, tokenizer, required.grammar, reply)
    assert not accepts(compiler, tokenizer, required.grammar,  # parallel_tool_calls false
                       call.replace("]}", ', {"name": "get_weather", "arguments": '
                                           '{"city": "Rome"}}]}'))


def test_history_is_polyfilled_for_templates_without_tools():
    history = ASK + [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    assert tools.history_for("hermes", history) is history
    generic = tools.history_for("generic", history)
    assert json.loads(generic[1]["content"]) == {
        "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}
    assert generic[2]["role"] == "user"
    assert json.loads(generic[2]["content"]) == {
        "tool_response": {"content": "sunny", "tool_call_id": "call_1"}}


def test_streamed_fragments_assemble_to_the_call():
    calls = [{"id": "call_a", "type": "function",
              "function": {"name": "f", "arguments": '{"x": 1, "y": "long text here"}'}}]
    deltas = tools.stream_fragments(calls)
    assert deltas[0][0] == {"index": 0, "id": "call_a", "type": "function",
                            "function": {"name": "f", "arguments": ""}}
    assert len(deltas) > 2  # the arguments come in several fragments
    assert "".join(d[0]["function"]["arguments"] for d in deltas) == \
        calls[0]["function"]["arguments"]


def test_text_before_a_call_streams_and_the_call_is_held():
    auto = tools.plan(HERMES_TEMPLATE, ASK, [WEATHER], "auto", True)
    streamer = tools.ContentStreamer(auto)
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    sent = [streamer.push(p) for p in ["Let me ", "look. <tool", "_call>", call[11:]]]
    assert sent == ["Let me ", "look. ", "", ""]
    content, calls = streamer.finish()
    assert content is None and calls[0]["function"]["name"] == "get_weather"
    # Text that only looked like the start of a call goes on, late by a few characters.
    streamer = tools.ContentStreamer(auto)
    assert [streamer.push(p) for p in ["a <tool", "s are here"]] == ["a ", "<tools are here"]
    assert streamer.finish() == ("", [])
    # A Llama 3 answer that opens as JSON is held; prose streams.
    llama = tools.plan(LLAMA3_TEMPLATE, ASK, [WEATHER], "auto", True)
    prose = tools.ContentStreamer(llama)
    assert prose.push("It is") == "It is"
    held = tools.ContentStreamer(llama)
    assert held.push(' {"name": "get_weather", ') == ""
    assert held.push('"parameters": {"city": "Rome"}}') == ""
    assert json.loads(held.finish()[1][0]["function"]["arguments"]) == {"city": "Rome"}
    # Forced calls and the generic format hold everything.
    forced = tools.ContentStreamer(tools.plan(HERMES_TEMPLATE, ASK, [WEATHER], "required", True))
    assert forced.push(call) == ""
    generic = tools.ContentStreamer(tools.plan("{{ messages }}", ASK, [WEATHER], "auto", True))
    assert generic.push('{"response": "hi"}') == "" and generic.finish() == ("hi", [])
