"""Structured output and tools with the official `openai` client against a live `opencamp serve`
on the real SmolLM2-135M-Instruct (its Q4_1 GGUF): parse() into pydantic models, json_object,
and tool calls forced by tool_choice, streamed and not. SmolLM2's template knows no tools, so
this is the generic format: tools described in a system message, the answer held to JSON."""
from __future__ import annotations

import json
from enum import Enum

import openai
import pydantic
import pytest

from serverkit import ServeProcess

NAME = "smollm2"


@pytest.fixture(scope="module")
def client(smollm2_gguf):
    process = ServeProcess(["--model", str(smollm2_gguf), "--threads", "2", "--max-context",
                            "2048", "--parallel", "4", "--served-model-name", NAME])
    try:
        url = process.wait_ready()
        with openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0,
                           timeout=300) as c:
            yield c
    finally:
        assert process.stop() == 0, process.output


class Address(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=30)
    country: str = pydantic.Field(max_length=30)


class Person(pydantic.BaseModel):  # a nested object, numbers with bounds
    name: str = pydantic.Field(max_length=30)
    age: int = pydantic.Field(ge=0, le=120)
    height_m: float = pydantic.Field(ge=0.5, le=2.5)
    address: Address


class Colour(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Palette(pydantic.BaseModel):  # enums, an array of objects
    favourite: Colour
    others: list[Colour] = pydantic.Field(max_length=3)


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=30)
    population_millions: float = pydantic.Field(ge=0, le=50)


class Cities(pydantic.BaseModel):
    cities: list[City] = pydantic.Field(min_length=1, max_length=3)


@pytest.mark.parametrize("model,question", [
    (Person, "Describe a made-up person who lives in Paris."),
    (Palette, "What is your favourite colour, and which others do you like?"),
    (Cities, "Name two big cities in Europe with their populations."),
])
def test_parse_returns_a_valid_instance(client, model, question):
    completion = client.chat.completions.parse(
        model=NAME, messages=[{"role": "user", "content": question}], response_format=model,
        temperature=0, max_tokens=200)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(choice.message.parsed, model)  # the client validated it with pydantic


def test_json_object_is_parseable_json_streamed_and_not(client):
    messages = [{"role": "user", "content": "What is the capital of France? Answer in JSON, as "
                                          "{\"capital\": ...}."}]
    whole = client.chat.completions.create(model=NAME, messages=messages, temperature=0,
                                           max_tokens=120, response_format={"type": "json_object"})
    answer = json.loads(whole.choices[0].message.content)
    assert answer == {"capital": "Paris"}
    stream = client.chat.completions.create(model=NAME, messages=messages, temperature=0,
                                            max_tokens=120, stream=True,
                                            response_format={"type": "json_object"})
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert json.loads(streamed) == answer


def test_vllm_guided_fields(client):
    def ask(**extra):
        return client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "Is Paris in France?"}],
            temperature=0, max_tokens=30, extra_body=extra).choices[0].message.content

    assert ask(guided_choice=["yes", "no"]) in ("yes", "no")
    import re
    assert re.fullmatch(r"(Yes|No), [A-Za-z ]{1,20}\.", ask(guided_regex=r"(Yes|No), [A-Za-z ]{1,20}\."))
    assert ask(structured_outputs={"choice": ["oui", "non"]}) in ("oui", "non")


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "additionalProperties": False,
                   "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 40},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                   "required": ["city"]}}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris?"}]


class WeatherArguments(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    city: str
    unit: str = pydantic.Field(pattern="^(celsius|fahrenheit)$")


def assembled(stream) -> tuple[list[dict], str | None]:
    """The streamed delta.tool_calls put together, as a client does, and the finish reason."""
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = delta.id or call["id"]
            call["name"] += (delta.function.name or "") if delta.function else ""
            call["arguments"] += (delta.function.arguments or "") if delta.function else ""
    return [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("tool_choice", [
    "required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_calls_validate_and_stream_the_same(client, tool_choice):
    request = dict(model=NAME, messages=ASK_WEATHER, tools=[WEATHER, TIME],
                   tool_choice=tool_choice, temperature=0, max_tokens=120)
    whole = client.chat.completions.create(**request)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls
    assert calls and all(c.type == "function" and c.id.startswith("call_") for c in calls)
    weather = [c for c in calls if c.function.name == "get_weather"]
    if isinstance(tool_choice, dict):
        assert weather == calls  # a named choice calls that function only
    for call in weather:
        WeatherArguments.model_validate_json(call.function.arguments)  # the schema holds
    streamed, finish = assembled(client.chat.completions.create(**request, stream=True))
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed] == [
        (c.function.name, json.loads(c.function.arguments)) for c in calls]
    assert all(c["id"] and c["id"].startswith("call_") for c in streamed)


def test_a_tool_result_continues_the_conversation(client):
    first = client.chat.completions.create(
        model=NAME, messages=ASK_WEATHER, tools=[WEATHER], tool_choice="required",
        temperature=0, max_tokens=60)
    call = first.choices[0].message.tool_calls[0]
    history = ASK_WEATHER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id,
         "content": json.dumps({"temperature": 21, "sky": "sunny"})}]
    follow = client.chat.completions.create(model=NAME, messages=history, tools=[WEATHER],
                                            temperature=0, max_tokens=60)
    choice = follow.choices[0]
    # The history went in: the call the model wrote and the tool's result, as the template
    # renders them.
    assert follow.usage.prompt_tokens > first.usage.prompt_tokens + 20
    # tool_choice auto in the generic format: a reply ({"response": ...}) or another call.
    if choice.finish_reason == "tool_calls":
        assert choice.message.tool_calls[0].function.name == "get_weather"
    else:
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.content, str) and choice.message.content.strip()


def test_tool_choice_without_tools_is_refused(client):
    with pytest.raises(openai.BadRequestError,
                       match="'tool_choice' is only allowed when 'tools' are specified"):
        client.chat.completions.create(model=NAME, messages=ASK_WEATHER, tool_choice="auto")
