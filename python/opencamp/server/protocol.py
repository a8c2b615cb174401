"""The OpenAI wire format: reading requests into checked parameters, and writing responses,
stream chunks and errors exactly as OpenAI's API does.

Nothing here touches the engine, so every rule can be tested without a model.
"""
from __future__ import annotations

import json
import math
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from .. import sampling
from ..grammar import Grammar

# Sampling fields a request may set: the one table's (see README "Sampling").
SAMPLING_FIELDS = sampling.NAMES
MAX_STOP_STRINGS = 16
MAX_CHOICES = 16  # n: choices per prompt
MAX_PROMPTS = 16  # prompts in one completions request
MAX_TOTAL_CHOICES = 64  # prompts x n
MAX_TOP_LOGPROBS = 20  # chat top_logprobs (OpenAI's limit; the engine's kMaxTopLogprobs)
MAX_COMPLETION_LOGPROBS = 5  # completions logprobs (OpenAI's limit)
# A log-probability of minus infinity (a token the penalties or NaN ruled out) as OpenAI writes
# it: JSON has no infinity.
LOGPROB_FLOOR = -9999.0


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code or ("invalid_value" if param else None))


@dataclass
class GenerationParams:
    """One checked request, ready for the scheduler."""

    kind: str  # "chat" or "completion"
    model: str | None
    messages: list[dict] | None = None  # chat
    prompt: str | list[int] | None = None  # completion: text or token ids (the first prompt)
    prompts: list[str | list[int]] = field(default_factory=list)  # completion: every prompt
    max_tokens: int | None = None  # None: the server default (or the rest of the context)
    sampling: dict[str, Any] = field(default_factory=dict)  # only the fields the request set
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False  # stream_options.continuous_usage_stats: usage on every chunk
    n: int = 1  # choices per prompt
    # None: no log-probabilities; else how many alternatives per token (chat: top_logprobs with
    # logprobs true; completions: logprobs)
    logprobs: int | None = None
    echo: bool = False  # completions: the prompt (and its log-probabilities) before the answer
    # Sampling's stage 0: what the answer must match, and the field that asked for it
    # (response_format, guided_*, structured_outputs); logit_bias; allowed_token_ids.
    grammar: Grammar | None = None
    grammar_param: str | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    # Chat only: the functions offered, tool_choice ("auto", "required" or
    # {"type": "function", "function": {"name": ...}}; "none" leaves tools None).
    tools: list[dict] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool = True
    template_tools: list[dict] | None = None  # what the chat template gets as tools= (app.py)



# ---- reading requests -------------------------------------------------------------------

# Limits on a request body's JSON, far beyond what any real request needs, so that no body can
# make the parser or later code recurse deeply, build huge integers or carry non-numbers.
MAX_JSON_DEPTH = 64  # nested arrays/objects
MAX_INT_DIGITS = 20  # enough for any 64-bit value (seeds); 10**400 is refused, not converted


class _Refused(Exception):
    """A JSON literal the parser hooks refuse; its message says which."""


def _parse_int(text: str) -> int:
    digits = len(text) - text.startswith("-")
    if digits > MAX_INT_DIGITS:
        raise _Refused(f"it holds an integer of {digits} digits; integers here have at most "
                       f"{MAX_INT_DIGITS}")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"the number {text[:40]} is out of range for a 64-bit float")
    return value


def _parse_constant(name: str):
    raise _Refused(f"{name} is not a JSON number")


def _check_nesting_and_text(body: Any, text: str) -> None:
    """Depth and lone UTF-16 surrogates, checked once for the whole body. Both walks are skipped
    when the raw text shows they cannot matter (few brackets; no \\u-escape in the D800-DFFF
    range), which is nearly every real request."""
    deep = text.count("[") + text.count("{") > MAX_JSON_DEPTH
    escapes = "\\ud" in text or "\\uD" in text
    if not (deep or escapes):
        return
    strings: list[str] = []
    stack = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            strings.append(value)
        elif isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise bad_request(f"the request body is nested more than {MAX_JSON_DEPTH} levels "
                                  "deep", code="invalid_json")
            if isinstance(value, dict):
                strings.extend(value)
                value = value.values()
            stack.extend((item, depth + 1) for item in value)
    try:
        "".join(strings).encode("utf-8")  # fails on any lone surrogate, wherever it is
    except UnicodeEncodeError:
        raise bad_request("the request body holds an unpaired UTF-16 surrogate (a \\uD800-"
                          "\\uDFFF escape without its pair), which is not text",
                          code="invalid_json") from None


def parse_json_body(raw: bytes) -> dict:
    """A request body as a JSON object, or a 400 saying what is wrong with it: not UTF-8, not
    JSON, nested too deeply, integers too long, NaN/Infinity, unpaired surrogates."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise bad_request(f"the request body is not valid JSON: it is not UTF-8 ({error})",
                          code="invalid_json") from None
    if not text.strip():
        raise bad_request("the request body is empty: send a JSON object")
    try:
        body = json.loads(text, parse_int=_parse_int, parse_float=_parse_float,
                          parse_constant=_parse_constant)
    except json.JSONDecodeError as error:
        raise bad_request(f"the request body is not valid JSON: {error}",
                          code="invalid_json") from None
    except _Refused as error:
        raise bad_request(f"the request body is not accepted: {error}", code="invalid_json") \
            from None
    except RecursionError:
        raise bad_request(f"the request body is nested more than {MAX_JSON_DEPTH} levels deep",
                          code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, not {type(body).__name__}")
    _check_nesting_and_text(body, text)
    return body


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _int(body: dict, name: str, low: int | None = None, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _is_int(value):
        raise bad_request(f"{name} must be an integer, got {json.dumps(value)}", name)
    if (low is not None and value < low) or (high is not None and value > high):
        rule = (f">= {low}" if high is None else f"<= {high}" if low is None
                else f"between {low} and {high}")
        raise bad_request(f"{name} must be {rule}, got {value}", name)
    return value


def _number(body: dict, name: str, check, rule: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_number(value):
        raise bad_request(f"{name} must be a number, got {json.dumps(value)}", name)
    if not check(float(value)):
        raise bad_request(f"{name} must be {rule}, got {value}", name)
    return float(value)


def _bool(body: dict, name: str) -> bool | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false, got {json.dumps(value)}", name)
    return value


def _sampling(body: dict) -> dict[str, Any]:
    """The sampling fields the request sets, checked by the one table (opencamp/sampling.py)
    in its OpenAI variant: temperature up to 2, top_k -1 for off, any integer seed."""
    out: dict[str, Any] = {}
    for name in SAMPLING_FIELDS:
        value = body.get(name)
        if value is None:
            continue
        try:
            out[name] = sampling.check(name, value, wire=True)
        except sampling.SamplingValueError as error:
            raise bad_request(str(error).replace(repr(value), json.dumps(value)), name) from None
    return out


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request("stop must be a string or a list of strings", "stop")
    stops = [s for s in stops if s != ""]  # OpenAI ignores empty ones
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}",
                          "stop")
    return stops


def _token_ids(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or not all(_is_int(t) and t >= 0 for t in value):
        raise bad_request(f"{name} must be a list of non-negative integer token ids", name)
    return list(value)


# Fields of OpenAI's and vLLM's APIs that would change the answer and that this server does not
# implement: refused with a 400 naming them, never silently ignored. (Fields that change nothing
# in the answer, such as user, metadata, store or service_tier, are accepted and ignored.)
REFUSED_FIELDS = {
    "suffix": "suffix (insertion) is not supported by this server",
    "functions": "functions are not supported by this server",
    "function_call": "function_call is not supported by this server",
    "audio": "audio output is not supported by this server",
    "modalities": "modalities other than text are not supported by this server",
    "prediction": "predicted outputs (prediction) are not supported by this server",
    "web_search_options": "web search is not supported by this server",
    "reasoning_effort": "reasoning_effort is not supported by this server",
    "verbosity": "verbosity is not supported by this server",
    "prompt_logprobs": "prompt_logprobs is not supported: use /v1/completions with echo and "
                       "logprobs",
    "use_beam_search": "beam search is not supported by this server",
    "length_penalty": "length_penalty (beam search) is not supported by this server",
    "min_tokens": "min_tokens is not supported by this server",
    "bad_words": "bad_words is not supported by this server",
    "typical_p": "typical_p is not supported by this server",
    "top_a": "top_a is not supported by this server",
    "truncate_prompt_tokens": "truncate_prompt_tokens is not supported by this server",
    "include_stop_str_in_output": "include_stop_str_in_output is not supported by this server",
    "logits_processors": "logits_processors are not supported by this server",
    "return_tokens_as_token_ids": "return_tokens_as_token_ids is not supported by this server",
    "add_generation_prompt": "add_generation_prompt is not supported: the server always adds "
                             "the assistant's turn",
    "continue_final_message": "continue_final_message is not supported by this server",
    "chat_template": "chat_template is not supported: the model's own template is used",
    "chat_template_kwargs": "chat_template_kwargs are not supported by this server",
    "documents": "documents are not supported by this server",
    "mm_processor_kwargs": "mm_processor_kwargs are not supported by this server",
}

# The one value of a refused field that asks for what this server does anyway.
REFUSED_FIELDS_ALLOWED = {"add_generation_prompt": True, "length_penalty": 1, "typical_p": 1,
                          "modalities": ["text"]}


def _refuse_unsupported(body: dict, kind: str) -> None:
    """Fields that would change the answer's meaning are refused, not silently ignored."""
    for name, message in REFUSED_FIELDS.items():
        value = body.get(name)
        # Off values are harmless (vLLM's clients send some of them by default), and so is
        # asking for what this server does anyway.
        if value in (None, False, [], {}, "") or value == REFUSED_FIELDS_ALLOWED.get(name, ...):
            continue
        raise bad_request(message, name)
    if kind == "chat" and body.get("echo"):
        raise bad_request("echo is only for /v1/completions", "echo")


def _schema(value: Any, name: str) -> dict:
    """A JSON schema given as an object or as its JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise bad_request(f"{name} must be a JSON schema (an object, or its JSON text)",
                              name) from None
    if not isinstance(value, dict):
        raise bad_request(f"{name} must be a JSON schema (an object)", name)
    return value


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise bad_request(f"{name} must be a non-empty string", name)
    return value


def _choice_list(value: Any, name: str) -> list[str]:
    if (not isinstance(value, list) or not value
            or not all(isinstance(c, str) and c for c in value)):
        raise bad_request(f"{name} must be a non-empty list of non-empty strings", name)
    return value


def _response_format(fmt: Any) -> Grammar | None:
    rule = ('response_format must be {"type": "text"}, {"type": "json_object"} or '
            '{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}')
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise bad_request(rule, "response_format")
    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return Grammar.json_object()
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise bad_request(rule, "response_format")
    if spec.get("strict") not in (None, True, False):
        raise bad_request("response_format.json_schema.strict must be true or false",
                          "response_format")
    # strict or not, the schema is enforced token by token: every answer matches it.
    schema = spec.get("schema")
    return Grammar.json_schema({} if schema is None else _schema(schema, "response_format"))


# vLLM's structured_outputs keys (and their guided_* forms).
_STRUCTURED = {"json": "guided_json", "regex": "guided_regex", "choice": "guided_choice",
               "grammar": "guided_grammar", "json_object": None}


def _grammar(body: dict) -> tuple[Grammar | None, str | None]:
    """The one constraint a request may set: response_format, a guided_* field, or
    structured_outputs (vLLM's newer form of guided_*), with the field that set it."""
    found: list[tuple[Grammar, str]] = []
    if body.get("response_format") is not None:
        grammar = _response_format(body["response_format"])
        if grammar is not None:
            found.append((grammar, "response_format"))

    def guided(kind: str, value: Any, name: str) -> Grammar:
        if kind == "json":
            return Grammar.json_schema(_schema(value, name))
        if kind == "regex":
            return Grammar.regex(_text(value, name))
        if kind == "choice":
            return Grammar.choice(_choice_list(value, name))
        if kind == "grammar":
            return Grammar("gbnf", _text(value, name))  # Lark or GBNF: llguidance reads both
        if value is not True:
            raise bad_request(f"{name} must be true", name)
        return Grammar.json_object()

    for kind, field_name in _STRUCTURED.items():
        if field_name is not None and body.get(field_name) is not None:
            found.append((guided(kind, body[field_name], field_name), field_name))
    structured = body.get("structured_outputs")
    if structured is not None:
        if not isinstance(structured, dict):
            raise bad_request("structured_outputs must be an object", "structured_outputs")
        for key, value in structured.items():
            name = f"structured_outputs.{key}"
            if key not in _STRUCTURED:
                raise bad_request(f"{name} is not supported by this server (it takes "
                                  f"{', '.join(_STRUCTURED)})", "structured_outputs")
            if value is not None and value is not False:
                found.append((guided(key, value, name), "structured_outputs"))
    if len(found) > 1:
        names = ", ".join(dict.fromkeys(name for _, name in found))
        raise bad_request(f"only one output constraint may be given, got {names}", found[1][1])
    whitespace = body.get("guided_whitespace_pattern")
    if whitespace is not None:
        _text(whitespace, "guided_whitespace_pattern")
        if not found or found[0][0].kind not in ("json_schema", "json_object"):
            raise bad_request("guided_whitespace_pattern applies to JSON output only (guided_json"
                              ", response_format json_*)", "guided_whitespace_pattern")
        grammar, name = found[0]
        found[0] = (Grammar(grammar.kind, grammar.value, whitespace), name)
    return found[0] if found else (None, None)


_FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def _tools(body: dict) -> tuple[list[dict] | None, Any]:
    """tools and tool_choice, checked as OpenAI does; tool_choice "none" drops the tools."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None:
        if choice is not None:
            raise bad_request("'tool_choice' is only allowed when 'tools' are specified",
                              "tool_choice")
        return None, None
    if not isinstance(tools, list) or not tools:
        raise bad_request("tools must be a non-empty list of {\"type\": \"function\", "
                          "\"function\": {...}} objects", "tools")
    checked = []
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise bad_request(f"{where} must be {{\"type\": \"function\", \"function\": "
                              "{...}} (the only kind of tool this server runs)", where)
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
                or not _FUNCTION_NAME.match(function["name"]):
            raise bad_request(f"{where}.function.name must be 1-64 letters, digits, _ or -",
                              f"{where}.function.name")
        if function.get("description") is not None and not isinstance(function["description"],
                                                                       str):
            raise bad_request(f"{where}.function.description must be a string",
                              f"{where}.function.description")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise bad_request(f"{where}.function.parameters must be a JSON schema object",
                              f"{where}.function.parameters")
        if function.get("strict") not in (None, True, False):
            raise bad_request(f"{where}.function.strict must be true or false",
                              f"{where}.function.strict")
        checked.append({"type": "function",
                        "function": {k: v for k, v in function.items() if v is not None}})
    names = [t["function"]["name"] for t in checked]
    if len(set(names)) != len(names):
        raise bad_request("tools holds two functions of the same name", "tools")
    if choice is None:
        choice = "auto"
    if isinstance(choice, dict):
        function = choice.get("function")
        if (choice.get("type") != "function" or not isinstance(function, dict)
                or function.get("name") not in names):
            raise bad_request("tool_choice must be \"none\", \"auto\", \"required\" or "
                              "{\"type\": \"function\", \"function\": {\"name\": <one of "
                              "tools>}}", "tool_choice")
        choice = {"type": "function", "function": {"name": function["name"]}}
    elif choice not in ("none", "auto", "required"):
        raise bad_request("tool_choice must be \"none\", \"auto\", \"required\" or a named "
                          "function", "tool_choice")
    return (None, None) if choice == "none" else (checked, choice)


def _choices(body: dict) -> int:
    n = _int(body, "n", low=1, high=MAX_CHOICES)
    n = 1 if n is None else n
    best_of = _int(body, "best_of", low=1, high=MAX_CHOICES)
    if best_of is not None and best_of != n:
        raise bad_request(f"best_of must equal n ({n}): this server does not rank extra "
                          f"candidates (got best_of={best_of})", "best_of")
    return n


def _logprobs(body: dict, kind: str) -> int | None:
    """How many alternatives per token the request wants with each token's log-probability
    (None: no log-probabilities), in OpenAI's two ways of asking."""
    if kind == "chat":
        wanted = _bool(body, "logprobs")
        top = _int(body, "top_logprobs", low=0, high=MAX_TOP_LOGPROBS)
        if top is not None and not wanted:
            if top == 0:
                return None
            raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
        return (top or 0) if wanted else None
    value = body.get("logprobs")
    if value is None:
        return None
    if isinstance(value, bool):  # the chat form sent to completions
        raise bad_request(f"logprobs must be an integer between 0 and {MAX_COMPLETION_LOGPROBS} "
                          f"here (the number of alternatives per token), got {json.dumps(value)}",
                          "logprobs")
    return _int(body, "logprobs", low=0, high=MAX_COMPLETION_LOGPROBS)


def _message_content(content: Any, index: int) -> str:
    """A message's text: a string, or a list of text content parts (what newer clients send)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad_request(f"messages[{index}].content: only text parts are supported, "
                                  f"got a {kind!r} part", f"messages[{index}].content")
            if not isinstance(part.get("text"), str):
                raise bad_request(f"messages[{index}].content: a text part needs a string 'text'",
                                  f"messages[{index}].content")
            texts.append(part["text"])
        return "".join(texts)
    raise bad_request(f"messages[{index}].content must be a string or a list of text parts",
                      f"messages[{index}].content")


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list of {\"role\", \"content\"} objects",
                          "messages")
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"messages[{index}] must be an object with role and content",
                              f"messages[{index}]")
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise bad_request(f"messages[{index}].role must be system, user or assistant, got "
                              f"{json.dumps(role)}", f"messages[{index}].role")
        content = message.get("content")
        if content is None and role == "assistant":
            content = ""
        entry = {"role": "system" if role == "developer" else role,
                 "content": _message_content(content, index)}
        if role == "assistant" and message.get("tool_calls") is not None:
            entry["tool_calls"] = _history_tool_calls(message["tool_calls"], index)
        if role == "tool":
            for key in ("tool_call_id", "name"):
                if message.get(key) is not None:
                    if not isinstance(message[key], str):
                        raise bad_request(f"messages[{index}].{key} must be a string",
                                          f"messages[{index}].{key}")
                    entry[key] = message[key]
        out.append(entry)
    return out


def _history_tool_calls(calls: Any, index: int) -> list[dict]:
    """An assistant message's tool_calls, with the arguments as objects (what chat templates
    read, as transformers and vLLM hand them over)."""
    where = f"messages[{index}].tool_calls"
    if not isinstance(calls, list):
        raise bad_request(f"{where} must be a list", where)
    out = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise bad_request(f"{where} items must be {{\"id\", \"type\": \"function\", "
                              "\"function\": {\"name\", \"arguments\"}}", where)
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                raise bad_request(f"{where}: the arguments of {function['name']} are not JSON",
                                  where) from None
        out.append({"id": call.get("id"), "type": "function",
                    "function": {"name": function["name"], "arguments": arguments}})
    return out


def _prompts(body: dict) -> list[str | list[int]]:
    """Every prompt of a completions request: a string, a list of token ids, or a list of
    either (several prompts in one request)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(_is_int(t) for t in prompt):
            return [_token_ids(prompt, "prompt")]
        if all(isinstance(p, (str, list)) for p in prompt):
            if len(prompt) > MAX_PROMPTS:
                raise bad_request(f"prompt holds {len(prompt)} prompts; at most {MAX_PROMPTS} "
                                  "per request", "prompt")
            out = []
            for p in prompt:
                if isinstance(p, list) and not p:
                    raise bad_request("prompt holds an empty list of token ids", "prompt")
                out.append(p if isinstance(p, str) else _token_ids(p, "prompt"))
            return out
        raise bad_request("prompt must be a string, a list of token ids, or a list of strings "
                          "or of token-id lists", "prompt")
    raise bad_request("prompt must be a string or a list of token ids", "prompt")


def _common(body: dict, kind: str) -> GenerationParams:
    _refuse_unsupported(body, kind)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("model must be a string", "model")
    max_tokens = _int(body, "max_completion_tokens", low=1, high=sampling.INT32_MAX)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", low=1, high=sampling.INT32_MAX)
    stream = bool(_bool(body, "stream"))
    options = body.get("stream_options")
    include_usage = continuous_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise bad_request("stream_options must be an object", "stream_options")
        if not stream:
            raise bad_request("stream_options is only allowed when stream is true",
                              "stream_options")
        include_usage = bool(_bool(options, "include_usage"))
        continuous_usage = bool(_bool(options, "continuous_usage_stats"))
    stop_token_ids = body.get("stop_token_ids")
    grammar, grammar_param = _grammar(body)
    logit_bias = body.get("logit_bias")
    if logit_bias is not None:
        try:
            logit_bias = sampling.check_logit_bias(logit_bias) or None
        except sampling.SamplingValueError as error:
            raise bad_request(str(error), "logit_bias") from None
    allowed = body.get("allowed_token_ids")
    if allowed is not None:
        allowed = _token_ids(allowed, "allowed_token_ids")
        if not allowed:
            raise bad_request("allowed_token_ids must name at least one token",
                              "allowed_token_ids")
    ignore_eos = bool(_bool(body, "ignore_eos"))
    if grammar is not None and ignore_eos:
        raise bad_request(f"ignore_eos cannot be combined with {grammar_param}: the constrained "
                          "answer ends with EOS", "ignore_eos")
    return GenerationParams(
        kind=kind, model=model, max_tokens=max_tokens, sampling=_sampling(body), stop=_stop(body),
        stop_token_ids=[] if stop_token_ids is None else _token_ids(stop_token_ids,
                                                                     "stop_token_ids"),
        ignore_eos=ignore_eos, stream=stream, include_usage=include_usage,
        continuous_usage=continuous_usage, n=_choices(body), logprobs=_logprobs(body, kind),
        grammar=grammar, grammar_param=grammar_param, logit_bias=logit_bias,
        allowed_token_ids=allowed)


def parse_chat_request(body: dict) -> GenerationParams:
    params = _common(body, "chat")
    params.messages = _messages(body)
    params.tools, params.tool_choice = _tools(body)
    parallel = _bool(body, "parallel_tool_calls")
    params.parallel_tool_calls = True if parallel is None else parallel
    if params.tools is not None and params.grammar is not None:
        raise bad_request(f"{params.grammar_param} cannot be combined with tools (unless "
                          "tool_choice is \"none\")", params.grammar_param)
    return params


def parse_completion_request(body: dict) -> GenerationParams:
    params = _common(body, "completion")
    params.prompts = _prompts(body)
    params.prompt = params.prompts[0]
    if len(params.prompts) * params.n > MAX_TOTAL_CHOICES:
        raise bad_request(f"{len(params.prompts)} prompts x n={params.n} is more than "
                          f"{MAX_TOTAL_CHOICES} choices in one request", "n")
    params.echo = bool(_bool(body, "echo"))
    for name in ("tools", "tool_choice", "parallel_tool_calls"):
        if body.get(name) is not None:
            raise bad_request(f"{name} is a chat completions field (POST /v1/chat/completions)",
                              name)
    return params


def context_error(prompt_tokens: int, max_tokens: int, context: int, kind: str) -> APIError:
    where = "messages" if kind == "chat" else "prompt"
    if prompt_tokens >= context:
        message = (f"This model's maximum context length is {context} tokens, but the "
                   f"{where} take {prompt_tokens} tokens, leaving none to generate. Please "
                   f"shorten the {where}.")
    else:
        message = (f"This model's maximum context length is {context} tokens. However, you "
                   f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the "
                   f"{where}, {max_tokens} in the completion). Please reduce the length of the "
                   f"{where} or the completion (max_tokens).")
    return APIError(400, message, param=where, code="context_length_exceeded")


# ---- writing responses ------------------------------------------------------------------

def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


@dataclass
class LogprobEntry:
    """One token for a response's logprobs: its text and exact bytes, its log-probability (None:
    the first prompt token, which has none) and the alternatives as (text, bytes, logprob)."""

    token: str
    bytes: bytes
    logprob: float | None
    top: list[tuple[str, bytes, float]] | None = None


def _logprob_value(value: float) -> float:
    return max(float(value), LOGPROB_FLOOR)  # -inf as OpenAI writes it


def chat_logprobs(entries: list[LogprobEntry]) -> dict:
    """OpenAI's chat shape: {"content": [{"token", "logprob", "bytes", "top_logprobs"}], ...}."""
    return {"content": [{"token": e.token, "logprob": _logprob_value(e.logprob),
                         "bytes": list(e.bytes),
                         "top_logprobs": [{"token": t, "logprob": _logprob_value(lp),
                                           "bytes": list(b)} for t, b, lp in (e.top or [])]}
                        for e in entries],
            "refusal": None}


def completion_logprobs(entries: list[LogprobEntry], text_offset: int = 0) -> dict:
    """OpenAI's legacy completions shape: parallel lists tokens, token_logprobs, top_logprobs
    (per token a {text: logprob} of the alternatives and the chosen token) and text_offset (each
    token's character offset in the choice's text, from `text_offset`)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        out["tokens"].append(e.token)
        out["text_offset"].append(text_offset)
        text_offset += len(e.token)
        if e.logprob is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(_logprob_value(e.logprob))
        top = {t: _logprob_value(lp) for t, _, lp in (e.top or [])}
        top.setdefault(e.token, _logprob_value(e.logprob))
        out["top_logprobs"].append(top)
    return out


@dataclass
class ChoiceResult:
    """One finished choice of a whole (not streamed) answer."""

    text: str | None  # None: a chat answer that is only tool calls
    finish_reason: str
    logprobs: dict | None = None  # already in the endpoint's shape
    tool_calls: list[dict] | None = None  # chat, in OpenAI's shape (tools.parse)


class ResponseWriter:
    """Builds the response objects of one request: a whole answer, or its stream of chunks.
    Choices are numbered by `index` (prompt x n + choice, as OpenAI numbers them)."""

    def __init__(self, kind: str, model: str, include_usage: bool = False,
                 system_fingerprint: str | None = None):
        self.kind = kind
        self.model = model
        self.include_usage = include_usage
        self.system_fingerprint = system_fingerprint
        self.id = new_id(kind)
        self.created = int(time.time())

    def _chunk(self, choices: list, usage_now: dict | None = None, **extra) -> dict:
        chunk = {"id": self.id,
                 "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
                 "created": self.created, "model": self.model,
                 "system_fingerprint": self.system_fingerprint, "choices": choices}
        if usage_now is not None:
            chunk["usage"] = usage_now  # stream_options.continuous_usage_stats
        elif self.include_usage:
            chunk["usage"] = None  # every chunk but the last says null, as OpenAI does
        chunk.update(extra)
        return chunk

    def _choice(self, delta_or_text, finish_reason: str | None, index: int = 0,
                logprobs: dict | None = None) -> dict:
        if self.kind == "chat":
            return {"index": index, "delta": delta_or_text, "logprobs": logprobs,
                    "finish_reason": finish_reason}
        return {"index": index, "text": delta_or_text, "logprobs": logprobs,
                "finish_reason": finish_reason}

    def first_chunk(self, index: int = 0, usage_now: dict | None = None) -> dict | None:
        """Chat streams open with the assistant's role; completion streams have no such chunk."""
        if self.kind != "chat":
            return None
        return self._chunk([self._choice({"role": "assistant", "content": ""}, None, index)],
                           usage_now)

    def content_chunk(self, text: str, index: int = 0, logprobs: dict | None = None,
                      usage_now: dict | None = None) -> dict:
        return self._chunk([self._choice({"content": text} if self.kind == "chat" else text,
                                         None, index, logprobs)], usage_now)

    def tool_calls_chunk(self, tool_calls: list[dict], index: int = 0) -> dict:
        """One `delta.tool_calls` fragment (see tools.stream_fragments)."""
        return self._chunk([self._choice({"tool_calls": tool_calls}, None, index)])

    def final_chunk(self, finish_reason: str, index: int = 0,
                    usage_now: dict | None = None) -> dict:
        return self._chunk([self._choice({} if self.kind == "chat" else "", finish_reason,
                                         index)], usage_now)

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
        return self._chunk([], usage=usage(prompt_tokens, completion_tokens, cached_tokens))

    def whole(self, choices: list[ChoiceResult], prompt_tokens: int, completion_tokens: int,
              cached_tokens: int) -> dict:
        out = []
        for index, c in enumerate(choices):
            if self.kind == "chat":
                message = {"role": "assistant", "content": c.text, "refusal": None}
                if c.tool_calls:
                    message["tool_calls"] = c.tool_calls
                out.append({"index": index, "message": message, "logprobs": c.logprobs,
                            "finish_reason": c.finish_reason})
            else:
                out.append({"index": index, "text": c.text, "logprobs": c.logprobs,
                            "finish_reason": c.finish_reason})
        return {"id": self.id, "object": "chat.completion" if self.kind == "chat"
                else "text_completion", "created": self.created, "model": self.model,
                "system_fingerprint": self.system_fingerprint, "choices": out,
                "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}


def sse(data: dict | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False,
                                                            separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


SSE_DONE = sse("[DONE]")
