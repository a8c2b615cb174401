"""The Starlette application: OpenAI-compatible routes, the chat page, /health and /metrics.

    app = create_app(lambda: opencamp.LLM("path/to/model"), ServerOptions(model_name="my-model"))

The model loads on a background thread when the app starts, so /health answers (503) at once
and turns 200 when the model is ready. Requests are checked completely (JSON, parameters,
prompt length against the context) before anything is queued, so every mistake gets a 4xx in
OpenAI's error shape; once a stream has begun, an error arrives as `data: {"error": ...}` and
the stream still ends with `data: [DONE]`.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .. import __version__, sampling
from ..grammar import GrammarError
from ..llm import LLM, Completion
from .metrics import PROMETHEUS_CONTENT_TYPE, ServerMetrics
from .protocol import (SSE_DONE, APIError, ChoiceResult, GenerationParams, LogprobEntry,
                       ResponseWriter, bad_request, chat_logprobs, completion_logprobs,
                       context_error, parse_chat_request, parse_completion_request,
                       parse_json_body, sse)
from .relay import Generation, QueueFull, RequestRelay
from . import tools as tool_calls

log = logging.getLogger("opencamp.server")

STATIC_DIR = Path(__file__).resolve().parent / "static"

# The sampling settings a server may preset (opencamp serve --temperature ...); a request's own
# values win. OpenAI's defaults unless the model's generation_config.json or the command says.
# The table (opencamp/sampling.py) holds them, with max_tokens None: up to the end of the context.
DEFAULT_SAMPLING = {**sampling.server_defaults(), "max_tokens": None}

# Where the start of the chat page's controls comes from when neither the model's
# generation_config.json nor the command sets any of these: llama.cpp's server defaults
# (Ollama's are close: 0.8, 40, 0.9). At OpenAI's temperature 1 with no cut-off a small model
# often wanders off in the long tail (SmolLM2-135M names an invented country as France's
# capital); min-p 0.05 drops that tail relative to the best token, and top-k / top-p bound it
# when the distribution is flat. The API itself keeps OpenAI's defaults.
CHAT_PAGE_SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}


@dataclass
class ServerOptions:
    model_name: str  # the id clients send as "model" and /v1/models lists
    model_aliases: tuple[str, ...] = ()  # other names accepted for it (e.g. the path given)
    api_key: str | None = None  # when set, /v1/* and /metrics need "Authorization: Bearer KEY"
    parallel: int = 4  # sequences decoding together (--max-running); more wait in a FIFO queue
    max_waiting: int = 256  # queued requests beyond which new ones get 429
    max_request_bytes: int = 1 << 20  # request bodies above this get 413
    # Host header names answered (exact names, or name:port; "*" for any). None: on a loopback
    # address only localhost, 127.0.0.1 and [::1] (DNS rebinding sends a foreign name), on any
    # other address every name (set --api-key there).
    allowed_hosts: tuple[str, ...] | None = None
    body_timeout: float = 30.0  # seconds a request body may take to arrive, else 408
    # Fair service for clients that do not read: a stream with this many tokens generated but
    # not delivered is paused off the batch (KV cache kept) until its client reads again...
    stream_buffer_tokens: int = 64
    # ...and ended, its KV cache freed, when the client reads nothing for this long (0: never).
    stream_idle_timeout: float = 60.0
    # Web page origins (scheme://host[:port], or "*") whose scripts may call the API (CORS).
    # Empty: none, so a page from elsewhere cannot use a local server; the chat page is served
    # from the server's own origin and needs nothing here.
    allowed_origins: tuple[str, ...] = ()
    defaults: dict[str, Any] = field(default_factory=dict)  # over DEFAULT_SAMPLING

    def sampling_defaults(self) -> dict[str, Any]:
        unknown = set(self.defaults) - set(DEFAULT_SAMPLING)
        if unknown:
            raise ValueError(f"unknown default(s): {', '.join(sorted(unknown))}")
        given = {k: v for k, v in self.defaults.items() if v is not None}
        for name, value in given.items():  # as a request's own value would be checked
            given[name] = (sampling.check_max_tokens(value) if name == "max_tokens"
                           else sampling.check(name, value, wire=True))
        return {**DEFAULT_SAMPLING, **given}


class ServerState:
    """The model as the routes see it: loading, ready or failed."""

    def __init__(self, model: LLM | Callable[[], LLM], options: ServerOptions,
                 on_ready: Callable[[LLM], None] | None = None,
                 on_load_error: Callable[[BaseException], None] | None = None):
        self.options = options
        self.defaults = options.sampling_defaults()
        # The chat page's starting controls: the server's defaults, or chat-friendly ones when
        # nothing (model or command) set any of CHAT_PAGE_SAMPLING's options.
        given = {k for k, v in options.defaults.items() if v is not None}
        self.page_defaults_source = "chat" if not given & set(CHAT_PAGE_SAMPLING) else "server"
        self.page_defaults = ({**self.defaults, **CHAT_PAGE_SAMPLING}
                              if self.page_defaults_source == "chat" else dict(self.defaults))
        self.system_fingerprint: str | None = None  # once the model is loaded
        self.metrics = ServerMetrics()
        self.started = int(time.time())
        self.llm: LLM | None = None
        self.scheduler: RequestRelay | None = None  # fronts the engine's _core.Scheduler
        self.load_error: str | None = None
        self._loader = model if callable(model) and not isinstance(model, LLM) else None
        self._on_ready = on_ready
        self._on_load_error = on_load_error
        self.loop: asyncio.AbstractEventLoop | None = None
        self.shutting_down = False
        self.shutdown_deadline_passed = False
        if self._loader is None:
            self._set_model(model)
        self._add_gauges()

    # ---- loading -------------------------------------------------------------------------

    def _set_model(self, llm: LLM) -> None:
        scheduler = RequestRelay(llm, parallel=self.options.parallel,
                                 max_waiting=self.options.max_waiting,
                                 stream_buffer_tokens=self.options.stream_buffer_tokens,
                                 stream_idle_timeout=self.options.stream_idle_timeout)
        scheduler.on_finish = self._record
        self.llm, self.scheduler = llm, scheduler
        # What produced the answers: the same fingerprint, the same engine, weights and format.
        made_by = f"{__version__}|{llm.model_path}|{llm.backend}|{llm.dtype}"
        self.system_fingerprint = "fp_" + hashlib.sha256(made_by.encode()).hexdigest()[:12]

    def start_loading(self) -> None:
        self.loop = asyncio.get_running_loop()
        if self._loader is not None and self.llm is None and self.load_error is None:
            threading.Thread(target=self._load, name="opencamp-load", daemon=True).start()

    def _load(self) -> None:
        try:
            llm = self._loader()
            self.loop.call_soon_threadsafe(self._loaded, llm, None)
        except BaseException as error:  # noqa: BLE001 - any failure means "no model"
            self.loop.call_soon_threadsafe(self._loaded, None, error)

    def _loaded(self, llm: LLM | None, error: BaseException | None) -> None:
        if error is not None:
            self.load_error = str(error) or type(error).__name__
            log.error("loading the model failed: %s", self.load_error)
            if self._on_load_error:
                self._on_load_error(error)
            return
        self._set_model(llm)
        if self._on_ready:
            self._on_ready(llm)

    def require_ready(self) -> tuple[LLM, RequestRelay]:
        if self.llm is None:
            if self.load_error is not None:
                raise APIError(503, f"the model failed to load: {self.load_error}",
                               type="server_error", code="model_load_failed")
            raise APIError(503, "the model is still loading; retry when GET /health says ok",
                           type="server_error", code="model_loading")
        return self.llm, self.scheduler

    def admit(self) -> tuple[LLM, RequestRelay]:
        """The model for a new generation request, or a 503 while loading or shutting down."""
        if self.shutting_down:
            raise APIError(503, "the server is shutting down; retry on another server or later",
                           type="server_error", code="server_shutting_down")
        return self.require_ready()

    def begin_shutdown(self, deadline: float) -> None:
        """Stop admitting generation requests (503), let the running ones finish for `deadline`
        seconds, then end the rest with an error event (streams still get `data: [DONE]`).
        Called on the event loop, by the server on SIGTERM or Ctrl-C."""
        if self.shutting_down:
            return
        self.shutting_down = True
        asyncio.get_running_loop().call_later(deadline, self.end_running)

    def end_running(self) -> None:
        """End every running generation now with a server_shutting_down error (and any that a
        request admitted before the shutdown would still start)."""
        self.shutdown_deadline_passed = True
        if self.scheduler is None:
            return
        for generation in self.scheduler.generations():
            generation.end_with(_shut_down_error())

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()

    # ---- metrics -------------------------------------------------------------------------

    def _add_gauges(self) -> None:
        m = self.metrics

        def stat(key):
            return lambda: self.scheduler.stats()[key] if self.scheduler else 0

        def mean_batch():
            if not self.scheduler:
                return 0.0
            s = self.scheduler.stats()
            return s["batch_tokens"] / s["steps"] if s["steps"] else 0.0

        m.add_gauge("opencamp_requests_running", "Requests in the engine's batch now.",
                    stat("running"))
        m.add_gauge("opencamp_requests_waiting", "Requests queued for a place in the batch.",
                    stat("waiting"))
        m.add_gauge("opencamp_model_ready", "1 once the model is loaded.",
                    lambda: 1 if self.llm is not None else 0)
        m.add_gauge("opencamp_kv_cache_blocks_total", "Blocks in the KV cache pool.",
                    lambda: self.scheduler.total_blocks if self.scheduler else 0)
        m.add_gauge("opencamp_scheduler_steps", "Forward passes the batching loop has run.",
                    stat("steps"))
        m.add_gauge("opencamp_requests_paused",
                    "Streams paused off the batch because their clients stopped reading.",
                    stat("paused"))
        m.add_gauge("opencamp_stream_idle_timeouts",
                    "Paused streams ended because their clients read nothing for "
                    "--stream-idle-timeout seconds.", stat("stream_timeouts"))
        m.add_gauge("opencamp_scheduler_preemptions",
                    "Requests pushed back to the queue to recompute later when the KV cache "
                    "filled up.", stat("preemptions"))
        m.add_gauge("opencamp_scheduler_mean_batch_tokens",
                    "Tokens per forward pass on average (decode tokens and prompt chunks).",
                    mean_batch)

    def _record(self, generation: Generation, completion: Completion | None) -> None:
        """Called on the event loop when a generation ends, whoever was still listening."""
        m, job = self.metrics, generation.job
        if completion is None:
            m.requests.inc(endpoint=job.endpoint, finish_reason="error")
            return
        m.requests.inc(endpoint=job.endpoint, finish_reason=completion.finish_reason)
        m.prompt_tokens.inc(completion.prompt_tokens)
        m.cached_prompt_tokens.inc(completion.cached_tokens)
        m.generation_tokens.inc(completion.completion_tokens)
        now = time.perf_counter()
        if generation.first_text_at is not None:
            m.time_to_first_token.observe(generation.first_text_at - job.arrived)
        if completion.completion_tokens > 1 and completion.decode_seconds > 0:
            m.decode_speed.observe(completion.decode_tokens_per_second)
        m.request_duration.observe(now - job.arrived)


# ---- helpers -----------------------------------------------------------------------------

def _shut_down_error() -> APIError:
    return APIError(503, "the server shut down before this generation finished",
                    type="server_error", code="server_shutting_down")


def _state(request: Request) -> ServerState:
    return request.app.state.opencamp


def _check_auth(request: Request) -> None:
    key = _state(request).options.api_key
    if not key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise APIError(401, "Missing API key: send it as the header 'Authorization: Bearer KEY' "
                       "(the key opencamp serve was started with, --api-key).",
                       code="invalid_api_key")
    if not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")


def _check_content_type(request: Request) -> None:
    """POST bodies must say they are JSON. A web page can send text/plain (or a form) to any
    address without a CORS preflight; application/json needs one, which this server grants
    only to the origins of --allowed-origins, so no other page the user visits can drive it."""
    given = request.headers.get("content-type", "")
    if given.split(";")[0].strip().lower() != "application/json":
        shown = f"'{given}'" if given else "none"
        raise APIError(415, f"Content-Type must be application/json (got {shown}): send the "
                       "request body as JSON with 'Content-Type: application/json'.",
                       code="unsupported_media_type")


async def _read_body(request: Request) -> bytes:
    limit = _state(request).options.max_request_bytes
    too_large = APIError(413, f"the request body is larger than this server's limit of {limit} "
                         "bytes (opencamp serve --max-request-bytes)", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    timeout = _state(request).options.body_timeout
    chunks, size = [], 0
    with anyio.move_on_after(timeout) as waited:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    if waited.cancelled_caught:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s (opencamp "
                       "serve --http-timeout)", code="request_timeout")
    return b"".join(chunks)


def _check_model(state: ServerState, model: str | None) -> None:
    names = (state.options.model_name, *state.options.model_aliases)
    if model is not None and model not in names:
        raise APIError(404, f"The model '{model}' does not exist: this server serves "
                       f"'{state.options.model_name}' (GET /v1/models lists it).",
                       param="model", code="model_not_found")


def _prepare(llm: LLM, params: GenerationParams):
    """Runs on a worker thread: every prompt's ids (templates and tokenizers can take a while on
    long prompts), the tool plan (None without tools), and one grammar matcher per choice
    (compiling one can take a while too; each choice advances its own)."""
    plan = None
    if params.kind == "chat":
        template = llm.tokenizer.chat_template if llm._tokenizer is not None else None
        messages = tool_calls.history_for(tool_calls.tool_format(template), params.messages)
        if params.tools is not None:
            plan = tool_calls.plan(template, messages, params.tools, params.tool_choice,
                                   params.parallel_tool_calls)
            messages, params.template_tools = plan.messages, plan.template_tools
        params.messages = messages
    prompts = _prompt_ids(llm, params)
    grammar, where = params.grammar, params.grammar_param
    if plan is not None and plan.grammar is not None:
        grammar, where = plan.grammar, "tools"
    constraints = []
    if grammar is not None:
        try:
            constraints = [llm.grammar_constraint(grammar)
                           for _ in range(len(prompts) * params.n)]
        except GrammarError as error:  # not valid, or llguidance is not installed
            raise bad_request(str(error), where) from None
    return prompts, plan, constraints


def _prompt_ids(llm: LLM, params: GenerationParams) -> list[list[int]]:
    """Every prompt's ids (chat: one)."""
    try:
        if params.kind == "chat":
            return [llm.chat_prompt_ids(params.messages, tools=params.template_tools)]
        prompts = [llm.tokenizer.encode(p, add_special_tokens=True) if isinstance(p, str)
                   else list(p) for p in params.prompts]
    except ValueError as error:  # chat template errors, messages the template refuses
        raise bad_request(str(error), "messages" if params.kind == "chat" else "prompt") from None
    vocab = llm.config["vocab_size"]
    bad = [t for p in prompts for t in p if t >= vocab]
    if bad:
        raise bad_request(f"prompt holds token id {bad[0]}, outside the vocabulary [0, {vocab})",
                          "prompt")
    return prompts


def _engine_options(state: ServerState, llm: LLM, params: GenerationParams,
                    prompt_tokens: int) -> dict[str, Any]:
    context = llm.max_context
    if prompt_tokens == 0:
        raise bad_request("the prompt is empty", "prompt")
    if params.max_tokens is not None:
        max_tokens = params.max_tokens
        if prompt_tokens + max_tokens > context:
            raise context_error(prompt_tokens, max_tokens, context, params.kind)
    else:
        if prompt_tokens >= context:
            raise context_error(prompt_tokens, 0, context, params.kind)
        default = state.defaults["max_tokens"]
        max_tokens = min(default, context - prompt_tokens) if default else context - prompt_tokens
    vocab = llm.config["vocab_size"]
    bad = [t for t in params.stop_token_ids if t >= vocab]
    if bad:
        raise bad_request(f"stop_token_ids holds {bad[0]}, outside the vocabulary [0, {vocab})",
                          "stop_token_ids")
    for name, ids in (("logit_bias", list(params.logit_bias or ())),
                      ("allowed_token_ids", params.allowed_token_ids or [])):
        bad = [t for t in ids if t >= vocab]
        if bad:
            raise bad_request(f"{name} holds {bad[0]}, outside the vocabulary [0, {vocab})", name)
    sampling = {k: v for k, v in state.defaults.items() if k != "max_tokens"}
    sampling.update(params.sampling)
    return dict(sampling, max_tokens=max_tokens, stop=params.stop,
                stop_token_ids=params.stop_token_ids, ignore_eos=params.ignore_eos,
                logprobs=params.logprobs, logit_bias=params.logit_bias,
                allowed_token_ids=params.allowed_token_ids)


def _engine_error(error: BaseException) -> APIError:
    """An error raised by the engine or the Python layer once a request was accepted."""
    if isinstance(error, APIError):
        return error
    kind = getattr(error, "kind", None)
    if kind == "invalid_argument" or isinstance(error, (ValueError, TypeError)):
        return bad_request(str(error))
    if kind == "capacity_exceeded":
        return APIError(400, str(error), code="context_length_exceeded")
    if kind == "timeout":  # the client stopped reading (--stream-idle-timeout)
        return APIError(408, str(error), code="stream_idle_timeout")
    return APIError(500, f"generation failed: {type(error).__name__}: {error}",
                    type="server_error", code="internal_error")


async def _until_disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# ---- generation routes -------------------------------------------------------------------

@dataclass
class _Plan:
    """The choices of one request: prompts x n, numbered as OpenAI numbers them."""

    llm: LLM
    params: GenerationParams
    prompts: list[list[int]]  # token ids of each prompt
    options: list[dict[str, Any]]  # engine options of each prompt (max_tokens included)
    tools: Any = None  # the tool plan (tools.ToolPlan) of a chat request with tools
    constraints: list = field(default_factory=list)  # each choice's grammar matcher, if any

    @property
    def total(self) -> int:
        return len(self.prompts) * self.params.n

    def prompt_of(self, index: int) -> int:
        return index // self.params.n

    def choice_options(self, index: int) -> dict[str, Any]:
        """Choice c of a prompt draws from its own seed stream: seed + c (reproducible when the
        request, or the server, sets a seed; random otherwise)."""
        options = dict(self.options[self.prompt_of(index)])
        choice = index % self.params.n
        if choice and options.get("seed") is not None:
            options["seed"] = (options["seed"] + choice) % 2**64
        if self.constraints:
            options["grammar"] = self.constraints[index]
        return options

    def answer(self, text: str, finish_reason: str) -> tuple[str | None, list[dict], str]:
        """(content, tool_calls, finish_reason) of a finished choice: with tools, the calls read
        out of the text (tools.parse), finish_reason "tool_calls" when there are any."""
        if self.tools is None:
            return text, [], finish_reason
        content, calls = tool_calls.parse(self.tools, text)
        return content, calls, "tool_calls" if calls else finish_reason

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    # ---- log-probabilities and echo, in the endpoint's shape ------------------------------

    def entry(self, record) -> LogprobEntry:
        """A TokenLogprob (opencamp.llm) as the response writes it."""
        tokenizer = self.llm.tokenizer

        def text(token_id: int) -> tuple[str, bytes]:
            raw = tokenizer.token_bytes(token_id)
            return raw.decode("utf-8", errors="replace"), raw

        token, raw = text(record.id)
        top = [(*text(i), lp) for i, lp in record.top] if record.top is not None else None
        return LogprobEntry(token, raw, record.logprob, top)

    def logprobs(self, records, text_offset: int = 0) -> dict | None:
        if self.params.logprobs is None:
            return None
        entries = [self.entry(r) for r in records or ()]
        if self.params.kind == "chat":
            return chat_logprobs(entries)
        return completion_logprobs(entries, text_offset)

    def echo_text(self, prompt: int) -> str:
        given = self.params.prompts[prompt]
        return given if isinstance(given, str) else self.llm.tokenizer.decode(self.prompts[prompt])

    def echo_entries(self, prompt: int) -> list[LogprobEntry]:
        """The prompt's tokens for echo with logprobs: the first has no log-probability. Runs
        on a worker thread (one pass over the prompt)."""
        ids = self.prompts[prompt]
        found = self.llm.prompt_logprobs(ids, self.params.logprobs)
        first = self.llm.tokenizer.token_bytes(ids[0])
        return ([LogprobEntry(first.decode("utf-8", errors="replace"), first, None)]
                + [self.entry(r) for r in found])


async def _generate(request: Request, kind: str) -> Response:
    arrived = time.perf_counter()
    state = _state(request)
    _check_auth(request)
    _check_content_type(request)
    body = parse_json_body(await _read_body(request))
    params = parse_chat_request(body) if kind == "chat" else parse_completion_request(body)
    _check_model(state, params.model)
    llm, scheduler = state.admit()
    prompts, tool_plan, constraints = await anyio.to_thread.run_sync(_prepare, llm, params)
    plan = _Plan(llm, params, prompts,
                 [_engine_options(state, llm, params, len(ids)) for ids in prompts],
                 tools=tool_plan, constraints=constraints)
    writer = ResponseWriter(kind, state.options.model_name, params.include_usage,
                            state.system_fingerprint)

    def busy(error: QueueFull) -> APIError:
        return APIError(429, f"the server is busy ({error}); retry later",
                        type="server_error", code="server_busy")

    try:
        scheduler.check_room()  # a full queue is a 429 before any stream begins
    except QueueFull as error:
        raise busy(error) from None

    async def start_one(index: int) -> Generation:
        if state.shutdown_deadline_passed:  # admitted before the shutdown, too late to start
            raise _shut_down_error()
        options = plan.choice_options(index)
        try:
            return await scheduler.start(plan.prompts[plan.prompt_of(index)],
                                         options["max_tokens"], options, endpoint=kind,
                                         arrived=arrived)
        except QueueFull as error:
            raise busy(error) from None
        except Exception as error:  # noqa: BLE001 - the engine refused it: a 400 (or a 500)
            raise _engine_error(error) from None

    async def start(started: list[Generation]) -> list[Generation]:
        """Every choice, appended to `started` as it starts (the caller cancels them): each
        prompt's first choice at once, the others of a prompt once its first has its first
        token, so they map the prompt's KV blocks from the prefix cache instead of prefilling
        the prompt again."""
        n = params.n
        firsts = []
        for p in range(len(prompts)):
            firsts.append(await start_one(p * n))
            started.append(firsts[-1])
        if n == 1:
            return started
        ordered = []
        for p, first in enumerate(firsts):
            await anyio.to_thread.run_sync(first.wait_first_token)
            ordered.append(first)
            for c in range(1, n):
                ordered.append(await start_one(p * n + c))
                started.append(ordered[-1])
        return ordered

    if params.stream:
        return StreamingResponse(_sse_stream(start, writer, plan), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # Not streamed: still stop generating when the client goes away.
    work = asyncio.ensure_future(_whole(start, writer, plan))
    gone = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
    if not work.done() or work.cancelled():
        return Response(status_code=499)  # nobody is listening any more
    return JSONResponse(work.result())


async def _collect(generation: Generation) -> tuple[str, Completion]:
    pieces: list[str] = []
    while True:
        event, value = await generation.next_event()
        if event == "text":
            pieces.append(value)
        elif event == "done":
            return "".join(pieces), value
        else:
            raise _engine_error(value)


async def _whole(start, writer: ResponseWriter, plan: _Plan) -> dict:
    started: list[Generation] = []
    try:
        generations = await start(started)
        echo = {}
        if plan.params.echo and plan.params.logprobs is not None:
            for p in range(len(plan.prompts)):
                try:
                    echo[p] = await anyio.to_thread.run_sync(plan.echo_entries, p)
                except Exception as error:  # noqa: BLE001 - the engine refused it (a full cache)
                    raise _engine_error(error) from None
        results = await asyncio.gather(*(_collect(g) for g in generations))
    finally:
        for generation in started:
            generation.cancel()  # a no-op once it has finished
    choices, completion_tokens, cached = [], 0, 0
    for index, (text, c) in enumerate(results):
        completion_tokens += c.completion_tokens
        prompt = plan.prompt_of(index)
        if index % plan.params.n == 0:
            cached += c.cached_tokens  # each prompt once, as its first choice found it
        logprobs = None
        if plan.params.echo:
            head = plan.echo_text(prompt)
            logprobs = plan.logprobs(c.logprobs, text_offset=len(head))
            if logprobs is not None:
                before = completion_logprobs(echo[prompt])
                logprobs = {k: before[k] + logprobs[k] for k in logprobs}
            text = head + text
        else:
            logprobs = plan.logprobs(c.logprobs)
        content, calls, finish_reason = plan.answer(text, c.finish_reason)
        choices.append(ChoiceResult(content, finish_reason, logprobs, calls or None))
    return writer.whole(choices, plan.prompt_tokens, completion_tokens, cached)


async def _events(generations: list[Generation]):
    """(choice index, event, value) from every generation, as they come. Each generation's
    events are taken only as fast as the response sends them (a bounded queue), so a client
    that stops reading holds every choice back."""
    if len(generations) == 1:
        while True:
            event, value = await generations[0].next_event()
            yield 0, event, value
            if event != "text":
                return
    merged: asyncio.Queue = asyncio.Queue(maxsize=len(generations))

    async def pump(index: int, generation: Generation) -> None:
        while True:
            event, value = await generation.next_event()
            await merged.put((index, event, value))
            if event != "text":
                return

    pumps = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(generations)]
    try:
        for _ in range(len(generations)):  # until every choice has ended
            while True:
                index, event, value = await merged.get()
                yield index, event, value
                if event != "text":
                    break
    finally:
        for task in pumps:
            task.cancel()


async def _sse_stream(start, writer: ResponseWriter, plan: _Plan):
    params = plan.params
    counts = [0] * plan.total  # completion tokens so far, per choice

    def usage_now() -> dict | None:
        if not params.continuous_usage:
            return None
        done = sum(counts)
        return {"prompt_tokens": plan.prompt_tokens, "completion_tokens": done,
                "total_tokens": plan.prompt_tokens + done}

    for index in range(plan.total):
        first = writer.first_chunk(index, usage_now())
        if first is not None:
            yield sse(first)
    started: list[Generation] = []
    # With tools, text before a call streams; the calls are read whole (tools.ContentStreamer).
    streamers = ([tool_calls.ContentStreamer(plan.tools) for _ in range(plan.total)]
                 if plan.tools is not None else None)
    try:
        generations = await start(started)
        offsets = [0] * plan.total  # characters of each choice's text sent (text_offset)
        if params.echo:
            for index in range(plan.total):
                prompt = plan.prompt_of(index)
                head = plan.echo_text(prompt)
                logprobs = None
                if params.logprobs is not None:
                    entries = await anyio.to_thread.run_sync(plan.echo_entries, prompt)
                    logprobs = completion_logprobs(entries)
                offsets[index] = len(head)
                yield sse(writer.content_chunk(head, index, logprobs, usage_now()))
        cached, completion_tokens = 0, 0
        async for index, event, value in _events(generations):
            if event == "text":
                counts[index] += len(value.token_ids)
                logprobs = plan.logprobs(value.logprobs, offsets[index])
                piece = value if streamers is None else streamers[index].push(value)
                if piece:
                    offsets[index] += len(piece)
                    yield sse(writer.content_chunk(piece, index,
                                                   logprobs if piece is value else None,
                                                   usage_now()))
            elif event == "done":
                c: Completion = value
                counts[index] = c.completion_tokens
                completion_tokens += c.completion_tokens
                if index % params.n == 0:
                    cached += c.cached_tokens
                finish_reason = c.finish_reason
                if streamers is not None:
                    content, calls = streamers[index].finish()
                    if calls:
                        finish_reason = "tool_calls"
                    if content:
                        yield sse(writer.content_chunk(content, index, None, usage_now()))
                    for delta in tool_calls.stream_fragments(calls):
                        yield sse(writer.tool_calls_chunk(delta, index))
                yield sse(writer.final_chunk(finish_reason, index, usage_now()))
            else:
                raise value
        if writer.include_usage:
            yield sse(writer.usage_chunk(plan.prompt_tokens, completion_tokens, cached))
    except APIError as error:
        yield sse(error.to_dict())
    except Exception as error:  # noqa: BLE001 - reported to the client, the server goes on
        if not isinstance(error, APIError) and _engine_error(error).status >= 500:
            log.error("stream failed: %s: %s", type(error).__name__, error)
        yield sse(_engine_error(error).to_dict())
    finally:
        # Reached on a client disconnect too (the task is cancelled): stop within one step.
        for generation in started:
            generation.cancel()
    yield SSE_DONE


async def chat_completions(request: Request) -> Response:
    return await _generate(request, "chat")


async def completions(request: Request) -> Response:
    return await _generate(request, "completion")


# ---- other routes ------------------------------------------------------------------------

def _model_card(state: ServerState) -> dict:
    card = {"id": state.options.model_name, "object": "model", "created": state.started,
            "owned_by": "opencamp"}
    if state.llm is not None:
        card["max_model_len"] = state.llm.max_context
    return card


async def list_models(request: Request) -> Response:
    _check_auth(request)
    return JSONResponse({"object": "list", "data": [_model_card(_state(request))]})


async def get_model(request: Request) -> Response:
    _check_auth(request)
    state = _state(request)
    _check_model(state, request.path_params["model"])
    return JSONResponse(_model_card(state))


async def health(request: Request) -> Response:
    state = _state(request)
    if state.shutting_down:
        return JSONResponse({"status": "shutting_down"}, status_code=503)
    if state.llm is not None:
        return JSONResponse({"status": "ok", "model": state.options.model_name})
    if state.load_error is not None:
        return JSONResponse({"status": "error", "message": state.load_error}, status_code=503)
    return JSONResponse({"status": "loading"}, status_code=503)


async def metrics(request: Request) -> Response:
    _check_auth(request)
    state = _state(request)
    extra = []
    if state.llm is not None:
        llm = state.llm
        stats = await anyio.to_thread.run_sync(llm.engine.cache_stats)  # may wait on the engine
        used, total = stats["used_blocks"], stats["total_blocks"]
        extra += [
            "# HELP opencamp_kv_cache_blocks_used Blocks of the KV cache pool in use.",
            "# TYPE opencamp_kv_cache_blocks_used gauge",
            f"opencamp_kv_cache_blocks_used {used}",
            "# HELP opencamp_kv_cache_usage_ratio Fraction of the KV cache pool in use.",
            "# TYPE opencamp_kv_cache_usage_ratio gauge",
            f"opencamp_kv_cache_usage_ratio {used / total if total else 0.0:.6f}",
            "# HELP opencamp_kv_cache_bytes_per_position Bytes one token position takes in the KV "
            "cache (keys and values of every layer, or of the global layers of a model with "
            "bounded sliding-window layers: see opencamp_kv_cache_window_*), in its type (the "
            "kv_dtype label).",
            "# TYPE opencamp_kv_cache_bytes_per_position gauge",
            f'opencamp_kv_cache_bytes_per_position{{kv_dtype="{llm.kv_cache_dtype}"}} '
            f'{stats["bytes_per_position"]}',
            "# HELP opencamp_kv_cache_bytes The KV cache's memory, every layer's pool.",
            "# TYPE opencamp_kv_cache_bytes gauge",
            f"opencamp_kv_cache_bytes {stats['bytes']}",
        ]
        # Pools of sliding-window layers (Gemma 3's local layers): about the window per sequence.
        windows = [g for g in stats["groups"][1:] if g["window"] > 0]
        for key, name, text in [
            ("used_blocks", "opencamp_kv_cache_window_blocks_used",
             "Blocks of a sliding-window layer group's pool in use (by window)."),
            ("total_blocks", "opencamp_kv_cache_window_blocks_total",
             "Blocks in a sliding-window layer group's pool (by window)."),
            ("bytes_per_position", "opencamp_kv_cache_window_bytes_per_position",
             "Bytes one position takes in a sliding-window layer group (by window), which keeps "
             "only the last positions of each sequence."),
        ]:
            if windows:
                extra += [f"# HELP {name} {text}", f"# TYPE {name} gauge"]
                extra += [f'{name}{{window="{g["window"]}"}} {g[key]}' for g in windows]
        # The engine's prefix cache: full blocks kept after their sequence ended, shared by
        # later prompts that start the same way.
        for key, name, kind, text in [
            ("sequences", "opencamp_kv_cache_sequences", "gauge",
             "Sequences holding KV cache blocks: running, paused, or kept conversations."),
            ("kept_sequences", "opencamp_kv_cache_kept_conversations", "gauge",
             "Finished conversations kept for their next turn (they give way when blocks are "
             "needed)."),
            ("kept_blocks", "opencamp_kv_cache_blocks_kept", "gauge",
             "Blocks the kept conversations hold (with nothing running, every used block)."),
            ("cached_blocks", "opencamp_kv_cache_blocks_cached", "gauge",
             "Blocks kept for prefix reuse by the engine (reclaimable)."),
            ("prefix_hit_blocks", "opencamp_kv_cache_prefix_hit_blocks_total", "counter",
             "Prompt blocks found in the engine's prefix cache."),
            ("prefix_miss_blocks", "opencamp_kv_cache_prefix_miss_blocks_total", "counter",
             "Prompt blocks not found in the engine's prefix cache."),
            ("evictions", "opencamp_kv_cache_evictions_total", "counter",
             "Cached blocks evicted to make room."),
        ]:
            if key in stats:
                extra += [f"# HELP {name} {text}", f"# TYPE {name} {kind}",
                          f"{name} {stats[key]}"]
        extra += [
            "# HELP opencamp_model_info The model served, and how.",
            "# TYPE opencamp_model_info gauge",
            f'opencamp_model_info{{model="{state.options.model_name}",backend="{llm.backend}",'
            f'dtype="{llm.dtype}",threads="{llm.threads}",version="{__version__}"}} 1',
        ]
    return Response(state.metrics.render(extra), media_type=PROMETHEUS_CONTENT_TYPE)


async def page_config(request: Request) -> Response:
    """What the chat page needs to start: the model, its context and the server's defaults."""
    state = _state(request)
    llm = state.llm
    return JSONResponse({
        "model": state.options.model_name, "version": __version__,
        "ready": llm is not None, "auth_required": bool(state.options.api_key),
        "max_context": llm.max_context if llm else None,
        "backend": llm.backend if llm else None, "defaults": state.defaults,
        # Where the page's controls start: "server" (the defaults above) or "chat" (the
        # chat-friendly CHAT_PAGE_SAMPLING, as no model or command default was set).
        "page_defaults": state.page_defaults, "page_defaults_source": state.page_defaults_source,
    })


async def _json_post(request: Request) -> dict:
    _check_auth(request)
    _check_content_type(request)
    return parse_json_body(await _read_body(request))


async def tokenize(request: Request) -> Response:
    """vLLM's POST /tokenize: {"prompt": text, "add_special_tokens": true} or {"messages":
    [...], "add_generation_prompt": true} -> {"count", "max_model_len", "tokens", "token_strs"}
    ("return_token_strs": true for each token's text)."""
    body = await _json_post(request)
    state = _state(request)
    _check_model(state, body.get("model"))
    llm, _ = state.require_ready()
    strs = body.get("return_token_strs")
    if strs is not None and not isinstance(strs, bool):
        raise bad_request("return_token_strs must be true or false", "return_token_strs")
    if "messages" in body:
        if body.get("add_generation_prompt") not in (None, True, False):
            raise bad_request("add_generation_prompt must be true or false",
                              "add_generation_prompt")
        messages = parse_chat_request({"messages": body["messages"]}).messages
        generation_prompt = body.get("add_generation_prompt") is not False

        def encode():
            try:
                return llm.tokenizer.encode_chat(messages,
                                                 add_generation_prompt=generation_prompt)
            except ValueError as error:
                raise bad_request(str(error), "messages") from None
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise bad_request("prompt must be a string (or send messages)", "prompt")
        special = body.get("add_special_tokens", True)
        if not isinstance(special, bool):
            raise bad_request("add_special_tokens must be true or false", "add_special_tokens")

        def encode():
            return llm.tokenizer.encode(prompt, add_special_tokens=special)
    tokens = await anyio.to_thread.run_sync(encode)
    token_strs = [llm.tokenizer.id_to_token(t) for t in tokens] if strs else None
    return JSONResponse({"count": len(tokens), "max_model_len": llm.max_context,
                         "tokens": tokens, "token_strs": token_strs})


async def detokenize(request: Request) -> Response:
    """vLLM's POST /detokenize: {"tokens": [ids]} -> {"prompt": text}."""
    body = await _json_post(request)
    state = _state(request)
    _check_model(state, body.get("model"))
    llm, _ = state.require_ready()
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens):
        raise bad_request("tokens must be a list of non-negative integer token ids", "tokens")
    vocab = llm.config["vocab_size"]
    bad = [t for t in tokens if t >= vocab]
    if bad:
        raise bad_request(f"tokens holds {bad[0]}, outside the vocabulary [0, {vocab})", "tokens")
    text = await anyio.to_thread.run_sync(llm.tokenizer.decode, tokens)
    return JSONResponse({"prompt": text})


async def index(request: Request) -> Response:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


# ---- errors ------------------------------------------------------------------------------

async def _api_error(request: Request, error: APIError) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    if error.status in (408, 413):
        headers = {"Connection": "close"}  # the rest of the body may still be on its way
    return JSONResponse(error.to_dict(), status_code=error.status, headers=headers)


async def _http_error(request: Request, error: HTTPException) -> Response:
    if error.status_code == 404:
        message = (f"Unknown request URL: {request.method} {request.url.path}. The API lives "
                   "under /v1 (POST /v1/chat/completions, POST /v1/completions, GET /v1/models).")
        code = "unknown_url"
    elif error.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
        code = "method_not_allowed"
    else:
        message, code = str(error.detail), None
    return JSONResponse(APIError(error.status_code, message, code=code).to_dict(),
                        status_code=error.status_code, headers=error.headers)


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


def _is_loopback(address: str) -> bool:
    return address == "::1" or address.startswith("127.") or address == "localhost"


def _split_host(host: str) -> tuple[str, str | None]:
    """'Name:port' -> ('name', 'port'); '[::1]:8000' -> ('[::1]', '8000')."""
    host = host.strip().lower()
    if host.startswith("["):
        name, _, rest = host.partition("]")
        return name + "]", rest[1:] if rest.startswith(":") else None
    name, colon, port = host.rpartition(":")
    return (name, port) if colon and port.isdigit() else (host, None)


class _Guard:
    """ASGI middleware around the whole app: refuses Host headers this server does not answer
    for, counts error statuses for /metrics, and answers an unexpected exception with a 500 in
    OpenAI's shape without re-raising it, so the client's keep-alive connection survives."""

    def __init__(self, app, state: "ServerState"):
        self.app, self.state = app, state

    def _allowed(self, scope) -> tuple[bool, tuple[str, ...]]:
        allowed = self.state.options.allowed_hosts
        server = scope.get("server") or (None, None)
        if allowed is None:
            if server[0] is None or not _is_loopback(server[0]):
                return True, ()
            allowed = LOOPBACK_HOSTS  # on any port: a rebinding page sends its own name
        if "*" in allowed:
            return True, allowed
        header = next((v for k, v in scope["headers"] if k == b"host"), None)
        if header is None:  # HTTP/1.0 without Host: no browser sends that
            return True, allowed
        name, port = _split_host(header.decode("latin-1"))
        names = {a.strip().lower() for a in allowed}
        return (name in names or (port is not None and f"{name}:{port}" in names)), allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def guarded_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if message["status"] >= 400:
                    self.state.metrics.http_errors.inc(status=str(message["status"]))
            await send(message)

        ok, allowed = self._allowed(scope)
        if not ok:
            host = next(v for k, v in scope["headers"] if k == b"host").decode("latin-1")
            shown = ", ".join(dict.fromkeys(_split_host(a)[0] for a in allowed))
            error = APIError(403, f"Host '{host}' is not allowed: this server answers for "
                             f"{shown}. A web page that reached it under another name (DNS "
                             "rebinding) is refused; to serve other names start it with "
                             "--allowed-hosts NAME (or '*' for any).", code="host_not_allowed")
            response = JSONResponse(error.to_dict(), status_code=403)
            return await response(scope, receive, guarded_send)
        try:
            await self.app(scope, receive, guarded_send)
        except ClientDisconnect:
            return  # the client left while its body was read: nobody to answer
        except Exception as error:  # noqa: BLE001 - a bug on one request must not end others
            log.exception("unexpected error on %s %s", scope.get("method"), scope.get("path"))
            if started:
                return  # mid-response: the server closes this connection, and goes on
            text = f"internal error: {type(error).__name__}: {error}"
            text = text.encode("utf-8", "replace").decode("utf-8")  # whatever the error holds
            body = APIError(500, text, type="server_error", code="internal_error").to_dict()
            await JSONResponse(body, status_code=500)(scope, receive, guarded_send)


def create_app(model: LLM | Callable[[], LLM], options: ServerOptions, *,
               on_ready: Callable[[LLM], None] | None = None,
               on_load_error: Callable[[BaseException], None] | None = None) -> Starlette:
    """The server for `model`: a loaded LLM, or a function that loads one (called on a thread
    when the app starts, while /health says 503)."""
    state = ServerState(model, options, on_ready=on_ready, on_load_error=on_load_error)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.start_loading()
        try:
            yield
        finally:
            state.close()

    routes = [
        Route("/", index),
        Route("/health", health),
        Route("/config", page_config),
        Route("/metrics", metrics),
        Route("/v1/models", list_models),
        Route("/v1/models/{model:path}", get_model),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        APIError: _api_error, HTTPException: _http_error})
    app.state.opencamp = state
    if options.allowed_origins:
        # Inside the guard: the Host check comes first; preflights (which carry no API key)
        # are answered here, the requests that follow still need the key.
        app.add_middleware(CORSMiddleware, allow_origins=list(options.allowed_origins),
                           allow_methods=["GET", "POST"],
                           allow_headers=["*"], max_age=600)
    app.add_middleware(_Guard, state=state)
    return app
