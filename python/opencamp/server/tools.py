"""Tool calling: how the model is told about the tools, how a forced call is enforced, and how
calls are read back out of its answer.

The format follows the model's chat template:

- "hermes" (Hermes, Qwen 2/2.5/3: the template writes `<tool_call>`): the tools go to the
  template as `tools=`; calls come as `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`.
- "llama3_json" (Llama 3.1+: the template knows `<|python_tag|>` / ipython): `tools=` too; a call
  is `{"name": ..., "parameters": {...}}`.
- "generic" (templates that know no tools, such as SmolLM2's): as llama.cpp's generic handler,
  the tools are described in a system message and the whole answer is JSON, either
  `{"tool_calls": [{"name": ..., "arguments": {...}}]}` or `{"response": "..."}`; the grammar
  enforces that shape (and each function's parameter schema) even under tool_choice auto.

tool_choice "required" and a named function are enforced by a grammar in every format, so the
arguments always validate against the function's schema; under "auto" the hermes and llama3
formats are parsed from free text.
"""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from ..grammar import Grammar


@dataclass
class ToolPlan:
    """What one request with tools needs: the messages and `tools=` for the template, the
    grammar (None: free text), and the format to parse the answer in."""

    format: str  # "hermes", "llama3_json", "generic"
    messages: list[dict]
    template_tools: list[dict] | None
    grammar: Grammar | None
    names: tuple[str, ...]


def tool_format(template: str | None) -> str:
    """Which call format the chat template speaks (see the module's doc)."""
    source = template or ""
    if "<tool_call>" in source:
        return "hermes"
    if "<|python_tag|>" in source or "ipython" in source:
        return "llama3_json"
    return "generic"


def history_for(fmt: str, messages: list[dict]) -> list[dict]:
    """The conversation as the template can render it. Templates that know tools read
    assistant `tool_calls` and `tool` messages themselves; for the generic format (a template
    that knows no tools) earlier calls become the JSON the model wrote, and tool results user
    messages holding {"tool_response": ...}, as llama.cpp's polyfill does."""
    if fmt != "generic":
        return messages
    out = []
    for message in messages:
        if message["role"] == "assistant" and message.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                     for c in message["tool_calls"]]
            out.append({"role": "assistant",
                        "content": json.dumps({"tool_calls": calls}, ensure_ascii=False)})
        elif message["role"] == "tool":
            response = {"content": message["content"]}
            for key in ("name", "tool_call_id"):
                if key in message:
                    response[key] = message[key]
            out.append({"role": "user",
                        "content": json.dumps({"tool_response": response}, ensure_ascii=False)})
        else:
            out.append(message)
    return out


def _parameters(tool: dict) -> dict:
    params = tool["function"].get("parameters")
    return params if isinstance(params, dict) and params else {"type": "object"}


def _call_schema(tool: dict, arguments_key: str = "arguments") -> dict:
    name = tool["function"]["name"]
    return {"type": "object",
            "properties": {"name": {"const": name}, arguments_key: _parameters(tool)},
            "required": ["name", arguments_key], "additionalProperties": False}


def _one_of(schemas: list[dict]) -> dict:
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


def _generic_system_prompt(tools: list[dict], choice: str) -> str:
    described = json.dumps([t["function"] for t in tools], ensure_ascii=False, indent=2)
    if choice == "auto":
        how = ('Respond in JSON: either {"tool_calls": [{"name": <function name>, "arguments": '
               '<arguments object>}]} to call one or more of the functions, or {"response": '
               '<your reply to the user>} to answer directly.')
    else:
        how = ('Respond in JSON: {"tool_calls": [{"name": <function name>, "arguments": '
               '<arguments object>}]} calling the function(s) the request needs.')
    return f"You can call these functions:\n{described}\n\n{how}"


def plan(template: str | None, messages: list[dict], tools: list[dict], choice: Any,
         parallel: bool) -> ToolPlan | None:
    """The plan for a request; None when tool_choice is "none" (the tools are left out)."""
    if choice == "none":
        return None
    fmt = tool_format(template)
    offered = tools
    if isinstance(choice, dict):  # a named function: only it
        offered = [t for t in tools if t["function"]["name"] == choice["function"]["name"]]
    names = tuple(t["function"]["name"] for t in offered)
    forced = choice != "auto"
    grammar = None
    if fmt == "generic":
        calls = {"type": "array", "items": _one_of([_call_schema(t) for t in offered]),
                 "minItems": 1}
        if not parallel:
            calls["maxItems"] = 1
        with_calls = {"type": "object", "properties": {"tool_calls": calls},
                      "required": ["tool_calls"], "additionalProperties": False}
        reply = {"type": "object", "properties": {"response": {"type": "string"}},
                 "required": ["response"], "additionalProperties": False}
        grammar = Grammar.json_schema(with_calls if forced else {"anyOf": [with_calls, reply]})
        system = _generic_system_prompt(offered, "auto" if not forced else "required")
        if messages and messages[0]["role"] == "system":
            messages = [{**messages[0], "content": messages[0]["content"] + "\n\n" + system},
                        *messages[1:]]
        else:
            messages = [{"role": "system", "content": system}, *messages]
        return ToolPlan(fmt, messages, None, grammar, names)
    if forced and fmt == "hermes":
        schema = {**_one_of([_call_schema(t) for t in offered]),
                  "x-guidance": {"whitespace_flexible": False, "item_separator": ", ",
                                 "key_separator": ": "}}  # as Grammar's JSON layout
        call = "%json " + json.dumps(schema)
        repeat = ' ("\\n" call)*' if parallel else ""
        grammar = Grammar.lark(f'start: call{repeat}\ncall: "<tool_call>\\n" {call} '
                               '"\\n</tool_call>"\n')
    elif forced:
        grammar = Grammar.json_schema(_one_of([_call_schema(t, "parameters") for t in offered]))
    return ToolPlan(fmt, messages, offered, grammar, names)


def _calls_from(objects: list[Any], names: tuple[str, ...]) -> list[dict]:
    calls = []
    for obj in objects:
        if not isinstance(obj, dict) or obj.get("name") not in names:
            return []
        arguments = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return []
        calls.append({"id": "call_" + secrets.token_hex(12), "type": "function",
                      "function": {"name": obj["name"],
                                   "arguments": json.dumps(arguments, ensure_ascii=False)}})
    return calls


_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def parse(tool_plan: ToolPlan, text: str) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of an answer: the calls in OpenAI's shape (arguments as a JSON
    string); content None when the answer is only calls. Text that holds no well-formed call to
    an offered function is all content."""
    if tool_plan.format == "generic":
        try:
            answer = json.loads(text)
        except ValueError:
            return text, []
        if isinstance(answer, dict) and isinstance(answer.get("tool_calls"), list):
            calls = _calls_from(answer["tool_calls"], tool_plan.names)
            if calls:
                return None, calls
        if isinstance(answer, dict) and isinstance(answer.get("response"), str):
            return answer["response"], []
        return text, []
    if tool_plan.format == "hermes":
        found = list(_HERMES_CALL.finditer(text))
        if not found:
            return text, []
        objects = []
        for match in found:
            try:
                objects.append(json.loads(match.group(1)))
            except ValueError:
                return text, []
        calls = _calls_from(objects, tool_plan.names)
        if not calls:
            return text, []
        content = _HERMES_CALL.sub("", text).strip()
        return content or None, calls
    body = text.strip().removeprefix("<|python_tag|>").strip()
    objects = []
    for part in body.split(";"):
        try:
            objects.append(json.loads(part))
        except ValueError:
            return text, []
    calls = _calls_from(objects, tool_plan.names)
    return (None, calls) if calls else (text, [])


class ContentStreamer:
    """A streamed answer with tools: text before any call is handed on as it comes (hermes and
    llama3 formats under tool_choice auto); from the first sign of a call (a `<tool_call>`, or
    an answer that opens as JSON) the rest is held, and finish() reads it whole. Forced calls
    and the generic format (always JSON) hold everything."""

    MARKER = "<tool_call>"

    def __init__(self, tool_plan: ToolPlan):
        self.plan = tool_plan
        self.free = tool_plan.grammar is None and tool_plan.format in ("hermes", "llama3_json")
        self.held = ""
        self.holding = not self.free

    def push(self, piece: str) -> str:
        """The part of `piece` (with what was held back) that may go to the client now."""
        self.held += piece
        if self.holding:
            return ""
        if self.plan.format == "llama3_json":
            start = self.held.lstrip()
            if not start:
                return ""
            if start.startswith(("{", "<|python_tag|>"[: len(start)])):
                self.holding = True
                return ""
            out, self.held = self.held, ""
            return out
        found = self.held.find(self.MARKER)
        if found >= 0:
            self.holding = True
            out, self.held = self.held[:found], self.held[found:]
            return out
        keep = next((n for n in range(min(len(self.MARKER) - 1, len(self.held)), 0, -1)
                     if self.MARKER.startswith(self.held[-n:])), 0)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out

    def finish(self) -> tuple[str | None, list[dict]]:
        """(the content not yet sent, the tool calls) from what was held."""
        content, calls = parse(self.plan, self.held)
        return content, calls


def stream_fragments(calls: list[dict], pieces: int = 3) -> list[list[dict]]:
    """The calls as `delta.tool_calls` lists, OpenAI style: per call a first delta with its
    index, id, type, name and empty arguments, then the arguments in a few fragments."""
    deltas = []
    for index, call in enumerate(calls):
        deltas.append([{"index": index, "id": call["id"], "type": "function",
                        "function": {"name": call["function"]["name"], "arguments": ""}}])
        arguments = call["function"]["arguments"]
        step = max(1, -(-len(arguments) // pieces))
        for start in range(0, len(arguments), step):
            deltas.append([{"index": index,
                            "function": {"arguments": arguments[start:start + step]}}])
    return deltas
